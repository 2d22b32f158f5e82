"""Shared fixtures: an isolated CPMANT_HOME per session, a small Chinese fixture corpus, a micro model config, a
temporary MLflow store per test that needs one, and Prefect's test harness for flow tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# a model small enough that a training step takes milliseconds on one core
MICRO_MODEL = {"dim_model": 32, "dim_ff": 64, "num_layers": 2, "num_heads": 2, "dim_head": 16,
               "position_bias_num_buckets": 16, "position_bias_max_distance": 128}


# Every test session writes under its own CPMANT_HOME; MLflow and Prefect never touch the user's. This happens at
# import, before Prefect is first imported: Prefect binds its console log handler to sys.stderr at import time, and
# a stream captured by one test's capsys is closed by the time a later flow logs.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="cpmant-test-home-"))
os.environ["CPMANT_HOME"] = str(_SESSION_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
from cpmant_cli.env import configure_environment  # noqa: E402

configure_environment()
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()


@pytest.fixture(scope="session", autouse=True)
def _isolated_home():
    yield _SESSION_HOME
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def fixture_corpus() -> Path:
    return FIXTURES / "corpus"


@pytest.fixture
def micro_pretrain_cfg(fixture_corpus, tmp_path):
    """A PretrainConfig for the micro model on the fixture corpus, writing into tmp_path."""
    from cpmant.training.config import PretrainConfig

    def make(**kw):
        base = dict(preset="tiny", model_overrides=MICRO_MODEL, corpus=str(fixture_corpus), vocab_size=600,
                    seq_len=64, micro_batch_size=4, max_steps=12, warmup_steps=4, lr=0.05, eval_interval=6,
                    eval_rows=8, save_interval=4, output_dir=str(tmp_path / "run"), encode_workers=1,
                    num_threads=1, min_piece_tokens=4)
        base.update(kw)
        return PretrainConfig(**base)

    return make


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store (and artifact root) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CPMANT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    yield home
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def registered_micro_model(home: Path, corpus: Path, model: dict | None = None, **train):
    """Point CPMANT_HOME at `home` (an isolated store), train a micro model there and register it as
    cpm-ant-tiny. Returns (monkeypatch to undo, model folder, registered version)."""
    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain
    from registry.register import register_checkpoint

    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    kw = dict(seq_len=64, micro_batch_size=4, max_steps=6, warmup_steps=2, eval_rows=4, encode_workers=1,
              min_piece_tokens=4)
    kw.update(train)
    kw.setdefault("eval_interval", kw["max_steps"])
    kw.setdefault("save_interval", kw["max_steps"])
    cfg = PretrainConfig(preset="tiny", model_overrides=model or MICRO_MODEL, corpus=str(corpus), vocab_size=600,
                         output_dir=str(home / "run"), **kw)
    res = pretrain(cfg, progress=False)
    return mp, res.model_dir, register_checkpoint(res.model_dir, "cpm-ant-tiny")


def micro_lm(corpus: Path, vocab_dir: Path, **model_overrides):
    """A randomly initialised micro CPM-Ant (seed 0) and a 600-token vocab built from the fixture corpus plus the
    fine-tuning format's words: (model, tokenizer), for tests of the task formats on a real model."""
    import dataclasses

    import torch

    from cpmant.config import get_preset
    from cpmant.corpus import load_corpus
    from cpmant.factory import build_model
    from cpmant.tokenizer import CPMAntTokenizer, build_vocab

    c = load_corpus(corpus)
    vocab = build_vocab([*c.train, *c.valid, "是否正确相关方程摘要回复问题答案"], 600, vocab_dir / "vocab.txt")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_preset("tiny"), vocab_size=600, **{**MICRO_MODEL, **model_overrides}))
    return model, CPMAntTokenizer(vocab)


# the base of the delta registry tests: a micro config with 4 prompt and segment types
DELTA_BASE = dict(vocab_size=600, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=16,
                  position_bias_num_buckets=16, position_bias_max_distance=64, prompt_types=4, prompt_length=4,
                  segment_types=4)


def poems_vocab(corpus: Path, path: Path) -> Path:
    """A 600-token vocab of the fixture corpus's poems."""
    from cpmant.tokenizer import build_vocab

    return build_vocab((corpus / "poems.txt").read_text(encoding="utf-8").splitlines(), 600, path)
