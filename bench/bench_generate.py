"""Generation tokens/s: ours in fp32 and in bf16, and transformers' `generate` on the same weights.

Run from the repository root:  .venv/bin/python bench/bench_generate.py [--quick] [--threads N]
Writes bench/results/generate.json and prints a table; bench/README.md ("Generation") explains it.

Greedy decoding of max_new_tokens (64) after a prompt of 32 random token ids, batch 1 and 8, for the tiny and
d256-l4 configs (random weights). Ours: `cpmant.generate.generate_ids` (KV cache) in fp32 and in bf16 (through
GenerationConfig.precision where it exists, else cpmant.precision.autocast around the call); transformers:
CpmAntForCausalLM.generate (its KV cache) in fp32 and under bf16 autocast, loaded with to_hf_state_dict of our
weights. The four take turns round after round; ratios are medians of per-round ratios. Tokens/s counts the tokens
each one actually generated (ours stops at </s>, which random weights rarely choose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, markdown_table, median, paired_ratio, recording_load, run_benchmark  # noqa: E402
from bench_train_step import step_configs  # noqa: E402

MODES = {"full": dict(rounds=7, new_tokens=64, prompt_tokens=32, quick=False),
         "quick": dict(rounds=2, new_tokens=64, prompt_tokens=32, quick=True)}
BATCHES = (1, 8)


class IdTokenizer:
    """The tokenizer interface generate_ids needs, over texts that are space-separated token ids: the prompt is
    exactly the ids transformers gets, with no vocab file."""

    from cpmant.tokenizer import BOS_ID as bos_id, EOS_ID as eos_id, PAD_ID as pad_id, UNK_ID as unk_id

    newline_id = 4  # CPMAntTokenizer's newline id (banned at the first step)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def our_generate(model, rows, new_tokens: int, precision: str):
    """A callable: greedy generate_ids of `rows` (each [<s>] + ids) in `precision`; returns the generated count."""
    from cpmant.generate import GenerationConfig, generate_ids
    from cpmant.precision import autocast

    texts = [" ".join(map(str, r[1:])) for r in rows]
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    has_field = "precision" in {f.name for f in dataclasses.fields(GenerationConfig)}
    if has_field:
        kw["precision"] = precision
    ctx = contextlib.nullcontext if has_field else (lambda: autocast(precision, "cpu"))
    tok = IdTokenizer()

    def run():
        with ctx():
            return sum(len(x) for x in generate_ids(model, tok, texts, **kw))

    return run, ("GenerationConfig.precision" if has_field else "autocast around generate_ids")


def hf_generate(hf, rows, new_tokens: int, bf16: bool):
    import torch

    ids = torch.tensor(rows)

    def run():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, num_beams=1, pad_token_id=0)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    return run


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import torch
    from transformers import CpmAntForCausalLM
    from transformers.utils import logging as hf_logging

    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import BOS_ID, SENTINELS, SPECIAL_TOKENS

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report["meta"]["torch_threads"] = torch.get_num_threads()
    n, results = mode["new_tokens"], []
    for name, config in step_configs().items():
        torch.manual_seed(0)
        ours = CPMAnt(config).eval()
        hf = CpmAntForCausalLM(to_hf_config(config)).eval()
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
        for batch in BATCHES:
            g = torch.Generator().manual_seed(batch)
            body = torch.randint(len(SPECIAL_TOKENS), config.vocab_size - len(SENTINELS),
                                 (batch, mode["prompt_tokens"] - 1), generator=g)
            rows = [[BOS_ID, *r] for r in body.tolist()]
            fp32, how = our_generate(ours, rows, n, "fp32")
            bf16, _ = our_generate(ours, rows, n, "bf16")
            peers = {"ours_fp32": fp32, "ours_bf16": bf16, "hf_fp32": hf_generate(hf, rows, n, False),
                     "hf_bf16": hf_generate(hf, rows, n, True)}
            counts = {k: f() for k, f in peers.items()}  # warm-up, and the number of tokens each generates
            r: dict = {"config": name, "batch": batch, "new_tokens": n, "prompt_tokens": mode["prompt_tokens"],
                       "ours_bf16_via": how, "generated_tokens": counts}
            with recording_load(r):
                secs = interleave(peers, mode["rounds"])
            tps = {k: counts[k] / median(v) for k, v in secs.items()}

            def rat(a, b):  # median of per-round ratios of tokens/s (each peer's count is fixed)
                return paired_ratio([counts[a] / t for t in secs[a]], [counts[b] / t for t in secs[b]])

            r.update({f"{k}_tokens_per_s": v for k, v in tps.items()})
            r.update({"ours_bf16_vs_ours_fp32": rat("ours_bf16", "ours_fp32"),
                      "ours_fp32_vs_hf_fp32": rat("ours_fp32", "hf_fp32"),
                      "ours_bf16_vs_hf_fp32": rat("ours_bf16", "hf_fp32"),
                      "ours_bf16_vs_hf_bf16": rat("ours_bf16", "hf_bf16"),
                      "rounds_seconds": secs})
            print(f"   {name}, batch {batch}: ours fp32 {tps['ours_fp32']:,.0f} / bf16 {tps['ours_bf16']:,.0f}, "
                  f"transformers fp32 {tps['hf_fp32']:,.0f} / bf16 {tps['hf_bf16']:,.0f} tok/s "
                  f"(load {r['load_average']['after'][:1]})", flush=True)
            results.append(r)
        del ours, hf
    report["generate"] = results


def table(r: dict) -> str:
    rows = []
    for s in r["generate"]:
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        rows.append((f"{s['config']}, batch {s['batch']}",
                     f"{s['ours_fp32_tokens_per_s']:,.0f} / {s['ours_bf16_tokens_per_s']:,.0f}",
                     f"{s['hf_fp32_tokens_per_s']:,.0f} / {s['hf_bf16_tokens_per_s']:,.0f}",
                     f"{s['ours_bf16_vs_ours_fp32']:.2f}x", f"{s['ours_fp32_vs_hf_fp32']:.2f}x",
                     f"{s['ours_bf16_vs_hf_fp32']:.2f}x", f"{s['ours_bf16_vs_hf_bf16']:.2f}x",
                     " -> ".join(map(str, la))))
    return markdown_table(("generate", "tokens/s ours fp32 / bf16", "transformers fp32 / bf16", "ours bf16 / fp32",
                           "ours fp32 / tf fp32", "ours bf16 / tf fp32", "ours bf16 / tf bf16", "load"), rows)


def arguments(ap) -> None:
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")


if __name__ == "__main__":
    sys.exit(run_benchmark("generate", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="2 rounds (a smoke run)"))
