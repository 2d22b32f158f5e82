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
