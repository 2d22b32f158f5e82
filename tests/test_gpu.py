"""The gpu tier (opt-in: `pytest -m gpu`): the torch backend on CUDA reproduces the CPU loss curve."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")]


def test_torch_backend_on_cuda_matches_cpu(micro_pretrain_cfg, tmp_path):
    from cpmant.training.loop import pretrain

    cpu = pretrain(micro_pretrain_cfg(device="cpu", output_dir=str(tmp_path / "cpu")), progress=False)
    gpu = pretrain(micro_pretrain_cfg(device="cuda", output_dir=str(tmp_path / "gpu")), progress=False)
    a = [json.loads(x)["loss"] for x in (cpu.run_dir / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (gpu.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=1e-3)


# ---- memory-budget inference on CUDA (cpmant.offload) and --backend bminf -----------------------------------
def _gpu_checkpoint(tmp_path, fixture_corpus):
    from test_offload import _save  # tests/ is on sys.path (rootdir conftest, no package)

    return _save(tmp_path / "gpu-offload", fixture_corpus, dim_model=256, dim_ff=1024, num_layers=8, num_heads=4,
                 dim_head=64)  # 34 MiB: layers of 4 MiB dominate


def _greedy_gpu(model, tok, n=12):
    from cpmant.generate import generate_ids

    return generate_ids(model, tok, ["床前明月光", "白日依山尽"], max_new_tokens=n, temperature=0.0,
                        repetition_penalty=1.3, precision="fp32")


def test_cuda_layer_scheduler_generates_the_unconstrained_models_tokens(tmp_path, fixture_corpus):
    """BMInf's scheduler in cpmant.offload: resident layers on the GPU, the rest in pinned CPU memory and copied
    into two GPU buffers on a side stream; same greedy tokens as the whole model on the GPU, GPU peak in budget."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.memory import PeakMemory
    from cpmant.offload import load_with_budget

    folder = _gpu_checkpoint(tmp_path, fixture_corpus)
    full, tok = load_pretrained(folder, device="cuda")
    ref = _greedy_gpu(full, tok)
    del full  # cuBLAS's workspace stays allocated: part of the baseline, as it would be in a serving process
    torch.cuda.empty_cache()
    weights = (folder / "model.safetensors").stat().st_size
    budget = int(weights * 0.85)  # the plan's headroom (activations, KV cache, RUNTIME_SLACK) is about 12 MiB here
    with PeakMemory() as pm:
        model, tok = load_with_budget(folder, budget, device="cuda")
        out = _greedy_gpu(model, tok)
    plan = model.offload
    assert plan.streamed and plan.resident and plan.device.startswith("cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert out == ref
    assert model.offload_streamer.loads >= len(plan.streamed) * 12
    assert pm.cuda_peak_mb is not None and pm.cuda_peak_mb <= budget / 2**20 + 1


def test_backend_bminf_generates(tmp_path, fixture_corpus):
    """--backend bminf: BMInf's own wrapper (int8 W8A8 Linears, its scheduler) runs our model and generates."""
    pytest.importorskip("bminf", reason="bminf is not installed (pip install '.[cuda]' on the GPU machine)")
    from cpmant.offload import load_for_inference

    folder = _gpu_checkpoint(tmp_path, fixture_corpus)
    model, tok = load_for_inference(folder, 64 * 2**20, backend="bminf", int8=False)
    fp = _greedy_gpu(model, tok)
    assert [len(r) for r in fp] == [12, 12]
    model, tok = load_for_inference(folder, 64 * 2**20, backend="bminf", int8=True)
    q = _greedy_gpu(model, tok)
    assert all(len(r) > 0 for r in q)
