"""Delta tuning core: OpenDelta methods on CPMAnt (exact trainable counts), delta-only checkpoints that name their
base, strict composing, refusal on another base, LoRA merge parity, and the tuning loop on a small fake task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpmant import checkpoint as ck
from cpmant.config import ModelConfig, get_preset
from cpmant.delta import checkpoint as dck
from cpmant.delta.config import TuneConfig
from cpmant.delta.methods import apply_delta, method_names, trainable_parameters
from cpmant.delta.train import make_scheduler, sweep_lr, tune
from cpmant.errors import CpmantError
from cpmant.factory import build_model
from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS

pytestmark = pytest.mark.unit

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Micro models: one intra-op thread is faster than two fighting the other tests for 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = ModelConfig(vocab_size=100, dim_model=16, dim_ff=32, num_layers=2, num_heads=2, dim_head=8,
                  position_bias_num_buckets=16, position_bias_max_distance=64,
                  prompt_types=2, prompt_length=4, segment_types=2)


def inputs(B: int = 2, L: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randint(20, CFG.vocab_size - 60, (B, L), generator=g)
    inp[:, :CFG.prompt_length] = torch.arange(CFG.prompt_length)
    seg = torch.ones(B, L, dtype=torch.long)
    seg[:, :CFG.prompt_length] = 0
    return dict(input=inp, length=torch.full((B,), L), context=torch.ones(B, L, dtype=torch.long),
                position=torch.arange(L).repeat(B, 1), segment=seg, span=torch.zeros(B, L, dtype=torch.long))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    vocab = d / "vocab.txt"
    plain = [chr(0x4E00 + i) for i in range(CFG.vocab_size - len(SPECIAL_TOKENS) - len(SENTINELS))]
    vocab.write_text("".join(t + "\n" for t in (*SPECIAL_TOKENS, *plain, *SENTINELS)), encoding="utf-8")
    torch.manual_seed(0)
    m = build_model(CFG)
    return ck.save_model_dir(d / "model", m.state_dict(), CFG, vocab)


def randomize_delta(handle, seed: int = 1) -> None:
    """LoRA's B starts at zero (no change): give every delta tensor random values so that composing is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.trainable():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_lora_trainable_counts_match_cpm_ant():
    # CPM-ANT.md: 48 layers * 2 * (8*4096 + 4096*8) = 6,291,456 on 10b; 4 * 2 * (8*128 + 128*8) = 16,384 on tiny
    m = build_model(get_preset("10b"), meta=True)
    h = apply_delta(m, "lora")
    assert trainable_parameters(m) == h.num_trainable == 6_291_456
    tiny = get_preset("tiny")
    m = build_model(tiny, meta=True)
    apply_delta(m, "lora")
    assert trainable_parameters(m) == tiny.num_layers * 2 * (8 * tiny.dim_model + tiny.dim_model * 8) == 16_384
    # every method applies to CPMAnt, and only the delta is trainable (full: everything)
    for name in method_names():
        torch.manual_seed(0)
        m = build_model(CFG)
        total = sum(p.numel() for p in m.parameters())
        h = apply_delta(m, name, {"reduction_factor": 4} if name == "compacter" else None)  # 16 / 4 = phm dim 4
        assert 0 < h.num_trainable <= total
        assert (h.num_trainable == total) == (name == "full")
        assert set(m.state_dict()) == {n for n, _ in h.trainable()}  # freeze_module narrowed state_dict
        m(**inputs())  # it runs


def test_unknown_method_and_bad_params_list_the_known_ones():
    m = build_model(CFG)
    with pytest.raises(CpmantError) as e:
        apply_delta(m, "qlora")
    assert "lora" in e.value.fix and "full" in e.value.fix and "adapter" in e.value.fix
    with pytest.raises(CpmantError, match="r"):
        apply_delta(m, "lora", {"r": 0})
    with pytest.raises(CpmantError, match="matched no module"):
        apply_delta(build_model(CFG), "lora", {"modules": ["no_such_module"]})


def test_delta_checkpoint_holds_only_the_delta_and_composes_strictly(base_dir, tmp_path):
    model, _ = ck.load_pretrained(base_dir)
    h = apply_delta(model, "lora", {"r": 2})
    randomize_delta(h)
    want = model(**inputs())
    out = dck.save_delta(tmp_path / "d", h, base_dir, base_uri="models:/base/1", task="fake", metrics={"acc": 0.5})
    assert dck.is_delta_checkpoint(out) and not dck.is_delta_checkpoint(base_dir)
    assert sorted(p.name for p in out.iterdir()) == ["cpmant_meta.json", "delta.safetensors", "delta_config.json",
                                                     "vocab.txt"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / "delta.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == 2 * 2 * (2 * 16 + 16 * 2)  # layers * q,v * (A + B)
    assert all(".lora." in k for k in tensors)
    cfg = dck.read_delta_config(out)
    assert cfg["method"] == "lora" and cfg["params"]["r"] == 2 and cfg["base_uri"] == "models:/base/1"
    assert cfg["base_sha256"] == ck.sha256_file(base_dir / "model.safetensors") and cfg["task"] == "fake"
    meta = ck.read_meta(out)
    assert meta["files_sha256"]["delta.safetensors"] == ck.sha256_file(out / "delta.safetensors")
    dck.verify_delta(out)
    got_model, tok = dck.load_delta(base_dir, out, verify=True)
    assert torch.allclose(got_model(**inputs()), want, atol=1e-5)
    base_only, _ = ck.load_pretrained(base_dir)
    assert not torch.allclose(base_only(**inputs()), want, atol=1e-3)  # the delta changes the logits
    for method in ("adapter", "bitfit", "compacter"):  # lazily sized methods compose the same way
        m, _ = ck.load_pretrained(base_dir)
        hm = apply_delta(m, method, {"reduction_factor": 4} if method == "compacter" else None)
        randomize_delta(hm, seed=4)
        d = dck.save_delta(tmp_path / method, hm, base_dir)
        torch.testing.assert_close(dck.load_delta(base_dir, d)[0](**inputs()), m.eval()(**inputs()))
    # a damaged delta file is named
    (out / "delta.safetensors").write_bytes((out / "delta.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CpmantError, match="delta.safetensors"):
        dck.verify_delta(out)


def test_delta_refuses_another_base(base_dir, tmp_path):
    model, _ = ck.load_pretrained(base_dir)
    h = apply_delta(model, "lora")
    out = dck.save_delta(tmp_path / "d", h, base_dir)
    torch.manual_seed(5)
    other = build_model(CFG)  # same shapes, other weights: must never load silently
    other_dir = ck.save_model_dir(tmp_path / "other", other.state_dict(), CFG, base_dir / "vocab.txt")
    with pytest.raises(CpmantError, match="never loads onto another base") as e:
        dck.load_delta(other_dir, out)
    assert "retrain" in e.value.fix
    # a delta whose tensors do not fit its method is refused too (strict)
    cfg = json.loads((out / "delta_config.json").read_text())
    cfg["params"]["r"] = 4
    with pytest.raises(CpmantError, match="does not fit"):
        dck.attach_delta(ck.load_pretrained(base_dir)[0], out, cfg)
    # and an edited delta_config.json is caught by its recorded size / sha256
    (out / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CpmantError, match="delta_config.json"):
        dck.load_delta(base_dir, out)


def test_delta_verify_refuses_a_base_whose_weights_were_swapped_under_its_metadata(base_dir, tmp_path):
    import shutil

    out = dck.save_delta(tmp_path / "d", apply_delta(ck.load_pretrained(base_dir)[0], "lora"), base_dir)
    torch.manual_seed(5)
    other = ck.save_model_dir(tmp_path / "other", build_model(CFG).state_dict(), CFG, base_dir / "vocab.txt")
    forged = Path(shutil.copytree(base_dir, tmp_path / "forged"))
    shutil.copyfile(other / "model.safetensors", forged / "model.safetensors")  # same size, other weights
    dck.load_delta(base_dir, out, verify=True)  # the true base passes
    with pytest.raises(CpmantError, match="model.safetensors"):
        dck.load_delta(forged, out, verify=True)


def test_lora_merge_gives_the_same_logits_as_a_plain_checkpoint(base_dir, tmp_path):
    model, _ = ck.load_pretrained(base_dir)
    h = apply_delta(model, "lora")
    randomize_delta(h, seed=3)
    want = model(**inputs(seed=2))
    merged = dck.merge_delta(h)
    assert type(merged).__name__ == "CPMAnt" and not any(".lora." in k for k in merged.state_dict())
    assert sum(p.numel() for p in merged.parameters()) == sum(
        t.numel() for t in ck.load_model_dir(base_dir)[1].values())
    torch.testing.assert_close(merged(**inputs(seed=2)), want, atol=2e-4, rtol=1e-4)
    out = dck.save_merged(tmp_path / "merged", merged, base_dir / "vocab.txt")
    again, _ = ck.load_pretrained(out, verify=True)
    torch.testing.assert_close(again(**inputs(seed=2)), want, atol=2e-4, rtol=1e-4)
    # adapters do not fold into the weights, nor does LoRA into an int8 variant (which it does tune)
    m2, _ = ck.load_pretrained(base_dir)
    with pytest.raises(CpmantError, match="only lora"):
        dck.merge_delta(apply_delta(m2, "adapter"))
    q = build_model(CFG.replace(quantization="int8"))
    hq = apply_delta(q, "lora")
    assert hq.num_trainable == 2 * 2 * (8 * 16 + 16 * 8) and all(p.dtype == torch.float32 for _, p in hq.trainable())
    q(**inputs())
    with pytest.raises(CpmantError, match="int8"):
        dck.merge_delta(hq)


class FakeTask:
    """A task for the loop: predict a fixed token after each prompt (accuracy at the last position)."""

    name = "fake"
    primary_metric = "accuracy"
    target = 42

    def _batch(self, examples):
        B, L = len(examples), 8
        d = inputs(B, L)
        d["input"] = torch.stack([torch.tensor(e) for e in examples])
        return d

    def training_loss(self, model, tokenizer, examples):
        logits = model(**self._batch(examples))[:, -1]
        return F.cross_entropy(logits, torch.full((len(examples),), self.target))

    def evaluate(self, model, tokenizer, examples, batch_size):
        hits = 0
        for i in range(0, len(examples), batch_size):
            logits = model(**self._batch(examples[i: i + batch_size]))[:, -1]
            hits += int((logits.argmax(-1) == self.target).sum())
        return {"accuracy": hits / len(examples), "n": float(len(examples))}


def test_tune_learns_keeps_the_best_epoch_and_reports(base_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    ex = [[0, 1, 2, 3, *torch.randint(20, 40, (4,), generator=g).tolist()] for _ in range(24)]
    seen = []

    class CB:
        def on_eval(self, epoch, metrics):
            seen.append((epoch, metrics["accuracy"]))

    model, tok = ck.load_pretrained(base_dir)
    cfg = TuneConfig(epochs=4, batch_size=8, lr={"lora": 5e-2}, patience=2, seed=7, precision="fp32")
    res = tune(model, tok, FakeTask(), ex[:16], ex[16:], "lora", cfg, callbacks=CB(), progress=False)
    r = res.report
    assert r["trainable_params"] == 2 * 2 * (8 * 16 + 16 * 8) and r["lr"] == 5e-2
    # epoch 0 (the untuned start) is scored first
    assert [e for e, _ in seen] == list(range(0, r["epochs_run"] + 1)) and r["steps"] == 2 * r["epochs_run"]
    best = max(a for _, a in seen)
    assert r["best_metrics"]["accuracy"] == best == 1.0 and r["history"][1]["train_loss"] > r["history"][-1][
        "train_loss"]
    assert FakeTask().evaluate(model, tok, ex[16:], 4)["accuracy"] == best  # the model holds the best epoch
    out = dck.save_delta(tmp_path / "d", res.handle, base_dir, task="fake", state_dict=res.best_state)
    again, _ = dck.load_delta(base_dir, out)
    assert FakeTask().evaluate(again, tok, ex[16:], 4)["accuracy"] == best
    # seeded: the same run gives the same losses
    m2, _ = ck.load_pretrained(base_dir)
    r2 = tune(m2, tok, FakeTask(), ex[:16], ex[16:], "lora", cfg, progress=False).report
    assert [h["train_loss"] for h in r2["history"]] == [h["train_loss"] for h in r["history"]]
    # full fine-tuning saves a plain checkpoint that loads alone and records its base
    m3, _ = ck.load_pretrained(base_dir)
    res3 = tune(m3, tok, FakeTask(), ex[:16], ex[16:], "full", cfg.model_copy(update={"epochs": 1}), progress=False)
    full_dir = dck.save_delta(tmp_path / "full", res3.handle, base_dir, task="fake", state_dict=res3.best_state)
    assert not dck.is_delta_checkpoint(full_dir) and dck.read_delta_config(full_dir)["method"] == "full"
    plain, _ = ck.load_pretrained(full_dir, verify=True)
    torch.testing.assert_close(plain(**inputs()), m3(**inputs()))


class KeepTask(FakeTask):
    """Scored on agreeing with the untuned model's own predictions (1.0 at epoch 0 by construction) while training
    pushes every prediction to token 42: any step that moves the predictions makes valid worse."""

    def __init__(self, model, examples):
        with torch.no_grad():
            self.reference = model(**self._batch(examples))[:, -1].argmax(-1)
        assert (self.reference != self.target).any()  # training can change what the valid score sees

    def evaluate(self, model, tokenizer, examples, batch_size):
        pred = model(**self._batch(examples))[:, -1].argmax(-1)
        return {"accuracy": float((pred == self.reference).float().mean())}


def test_epoch_zero_is_kept_when_training_makes_valid_worse(base_dir):
    g = torch.Generator().manual_seed(1)
    ex = [[0, 1, 2, 3, *torch.randint(20, 40, (4,), generator=g).tolist()] for _ in range(24)]
    model, tok = ck.load_pretrained(base_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    task = KeepTask(model, ex[16:])
    cfg = TuneConfig(epochs=2, batch_size=8, lr={"full": 0.5}, patience=0, seed=7, precision="fp32")
    r = tune(model, tok, task, ex[:16], ex[16:], "full", cfg, progress=False).report
    scores = [h["metrics"]["accuracy"] for h in r["history"]]
    assert scores[0] == 1.0 and len(scores) == 3 and max(scores[1:]) < 1.0  # both trained epochs are worse
    assert r["best_epoch"] == 0 and r["best_metrics"]["accuracy"] == 1.0 and r["steps"] == 4
    for k, v in model.state_dict().items():  # the returned weights are the initial ones
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    assert task.evaluate(model, tok, ex[16:], 8)["accuracy"] == 1.0


def test_schedule_warms_up_then_decays_and_defaults_are_cpm_lives():
    cfg = TuneConfig(warmup_ratio=0.25)
    assert (cfg.weight_decay, cfg.grad_clip) == (0.01, 10.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, warmup = make_scheduler(opt, cfg, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup round(0.25 * 8) = 2 steps: 1/2, 2/2; then 0.5 (1 + cos(pi p)), p = (s - 2) / (9 - 2) for s = 3..8
    # (the cosine ends one step after the last, so the last step still learns)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 7)) for s in range(3, 9)]
    assert warmup == 2 and lrs == pytest.approx(expected)


def test_sweep_chooses_the_lr_with_the_best_valid_score(base_dir):
    g = torch.Generator().manual_seed(0)
    ex = [[0, 1, 2, 3, *torch.randint(20, 40, (4,), generator=g).tolist()] for _ in range(24)]
    evals = []

    class Counting(FakeTask):
        def evaluate(self, model, tokenizer, examples, batch_size):
            evals.append(1)
            return super().evaluate(model, tokenizer, examples, batch_size)

    _, tok = ck.load_pretrained(base_dir)
    cfg = TuneConfig(epochs=3, batch_size=8, patience=0, seed=7, precision="fp32", lr_grid={"lora": [1e-5, 1e-1]})
    sw = sweep_lr(lambda: ck.load_pretrained(base_dir)[0], tok, Counting(), ex[:16], ex[16:], "lora", cfg,
                  progress=False)
    assert sw.grid == (1e-5, 1e-1) and [r["lr"] for r in sw.rows] == [1e-5, 1e-1]
    tiny, big = (r["valid_score"] for r in sw.rows)
    assert big == 1.0 > tiny and sw.lr == 1e-1 and sw.best.report["lr"] == 1e-1
    assert sw.best.report["lr_grid"] == [1e-5, 1e-1] and sw.best.report["lr_sweep"] == sw.rows
    assert len(evals) == 1 + 2 * 3  # epoch 0 scored once for the whole sweep, then 3 epochs per lr
    assert FakeTask().evaluate(sw.best.handle.model, tok, ex[16:], 8)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="lr_grid.lora has 4 values"):
        TuneConfig(lr_grid={"lora": [1e-4, 1e-3, 1e-2, 1e-1]})
