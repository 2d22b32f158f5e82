"""The peak memory `cpmant generate --memory-budget` prints: within the budget at every budget that does not error,
the smallest one named by the error (issue 19), and counting loading and generating only: for a registry URI it does
not include MLflow's import and the files' fetch (issue 17, bad input 13: about 160 MiB more than for the same
model's folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import registered_micro_model

pytestmark = pytest.mark.unit

PEAK = re.compile(r"peak resident memory ([\d.]+) MiB of the ([\d.]+) MiB budget")  # the line cpmant generate prints


def _peak_mib(home, model: str) -> float:
    """The peak printed by the console script in a fresh process (nothing imported or fetched before it starts)."""
    env = {**os.environ, "CPMANT_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "cpmant_cli.main", "generate", model, "床前", "--max-new-tokens", "2",
                        "--memory-budget", "1GB"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    m = PEAK.search(p.stderr)
    assert m, p.stderr
    assert "above the baseline taken after the model files are fetched" in p.stderr
    return float(m.group(1))


def test_registry_uri_peak_excludes_the_fetch(tmp_path, fixture_corpus):
    mp, model_dir, _ = registered_micro_model(tmp_path / "home", fixture_corpus)
    try:
        from_registry = _peak_mib(tmp_path / "home", "models:/cpm-ant-tiny/1")  # fetched into the cache here
        from_folder = _peak_mib(tmp_path / "home", str(model_dir))
    finally:
        mp.undo()
    # the micro model is well under 1 MiB: both peaks are the same loading and generating, up to allocator noise
    assert abs(from_registry - from_folder) < 20, (from_registry, from_folder)


# ---- the memory budget is a budget (issue 19) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed_model(tmp_path_factory, fixture_corpus):
    """24 layers of d256 / dim_ff 1024 (about 98 MiB of fp32 weights, 4 MiB a layer): large enough that a budget of
    a quarter of its weights still holds the smallest plan (embeddings, two streamed layers, headroom)."""
    import torch

    from cpmant.checkpoint import save_model_dir
    from cpmant.config import ModelConfig
    from cpmant.factory import build_model
    from cpmant.tokenizer import build_vocab

    folder = tmp_path_factory.mktemp("budget") / "model"
    texts = [ln for f in sorted(fixture_corpus.glob("*.txt")) for ln in f.read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    vocab = build_vocab(texts, 600, folder.parent / "vocab.txt")
    cfg = ModelConfig(vocab_size=len(vocab.read_text(encoding="utf-8").splitlines()), dim_model=256, dim_ff=1024,
                      num_layers=24, num_heads=4, dim_head=64, position_bias_num_buckets=16,
                      position_bias_max_distance=256)
    torch.manual_seed(0)
    save_model_dir(folder, build_model(cfg).state_dict(), cfg, vocab)
    return folder


def _generate(home, folder, budget: int, int8: bool) -> subprocess.CompletedProcess:
    """`cpmant generate FOLDER TEXT --memory-budget BUDGET [--int8]` through the console script, a new process."""
    script = os.path.join(os.path.dirname(sys.executable), "cpmant")
    env = {**os.environ, "CPMANT_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [script, "generate", str(folder), "床前明月光", "--max-new-tokens", "3", "--memory-budget", str(budget)]
    return subprocess.run(cmd + (["--int8"] if int8 else []), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_printed_peak_stays_within_three_budgets(tmp_path, streamed_model, int8):
    weights = (streamed_model / "model.safetensors").stat().st_size
    layers_seen = set()
    for fraction in (2, 3, 4):  # 1/2, 1/3 and 1/4 of the fp32 weights
        budget = weights // fraction
        p = _generate(tmp_path, streamed_model, budget, int8)
        assert p.returncode == 0, p.stderr[-3000:]
        m = PEAK.search(p.stderr)
        assert m, p.stderr[-3000:]
        peak, said = float(m.group(1)), float(m.group(2))
        assert said == pytest.approx(budget / 2**20, abs=0.06)
        assert peak <= budget / 2**20, (fraction, peak, budget / 2**20, p.stderr[-1500:])
        assert "weights, streaming ring, int8 packs, activations, KV cache" in p.stderr
        layers_seen.add(re.search(r"(\d+) of 24 layers resident", p.stderr).group(1))
    assert len(layers_seen) >= 2  # the budgets make different plans, some layers streamed


def test_a_budget_below_the_smallest_is_one_clear_error(tmp_path, streamed_model):
    from cpmant.offload import parse_size

    p = _generate(tmp_path, streamed_model, 8 * 2**20, False)
    assert p.returncode != 0
    assert "too small for this model" in p.stderr and "Traceback" not in p.stderr
    least = parse_size(re.search(r"--memory-budget (\S+) or more", p.stderr).group(1))
    assert 8 * 2**20 < least < (streamed_model / "model.safetensors").stat().st_size // 4
    ok = _generate(tmp_path, streamed_model, least, False)  # the smallest it names works, within itself
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert float(PEAK.search(ok.stderr).group(1)) <= least / 2**20
