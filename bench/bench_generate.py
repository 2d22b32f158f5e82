"""Generation tokens/s: ours in fp32 and int8 (and bf16 with --bf16), and transformers' `generate` on the same weights.

Run from the repository root:  .venv/bin/python bench/bench_generate.py [--quick] [--threads N] [--bf16]
Writes bench/results/generate.json and prints a table; bench/README.md ("Generation") explains it.

Greedy decoding of max_new_tokens (64) after a prompt of 32 random token ids, batch 1 and 8, for the tiny preset and
d512-l8 (the tiny preset with dim 512, dim_ff 1536, 8 heads of 64, 8 layers), random weights. Ours:
`cpmant.generate.generate_ids` (KV cache) in fp32, and the int8 model of the same weights
(`cpmant.compress.quantize.quantize_model`, run through the int8 kernel); with --bf16 also ours in bf16 and
transformers under bf16 autocast. transformers: CpmAntForCausalLM.generate (its KV cache) in fp32, loaded with
to_hf_state_dict of our weights (the same weights as `cpmant convert --to hf` writes). The peers take turns round
after round; ratios are medians of per-round ratios. Tokens/s counts the tokens each one actually generated (ours
stops at </s>, which random weights rarely choose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, markdown_table, median, paired_ratio, recording_load, run_benchmark  # noqa: E402


def generate_configs():
    from cpmant.config import get_preset

    tiny = get_preset("tiny")  # vocab 8000, dim 128, 4 layers: the CPU default
    return {"tiny": tiny,
            "d512-l8": tiny.replace(dim_model=512, dim_ff=1536, num_heads=8, dim_head=64, num_layers=8)}

MODES = {"full": dict(rounds=5, new_tokens=64, prompt_tokens=32, quick=False),
         "quick": dict(rounds=1, new_tokens=64, prompt_tokens=32, quick=True)}
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

    from cpmant.compress.quantize import quantize_model
    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import BOS_ID, SENTINELS, SPECIAL_TOKENS

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report["meta"]["torch_threads"] = torch.get_num_threads()
    n, results = mode["new_tokens"], []
    for name, config in generate_configs().items():
        torch.manual_seed(0)
        ours = CPMAnt(config).eval()
        int8 = quantize_model(ours).eval()
        hf = CpmAntForCausalLM(to_hf_config(config)).eval()
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
        for batch in BATCHES:
            g = torch.Generator().manual_seed(batch)
            body = torch.randint(len(SPECIAL_TOKENS), config.vocab_size - len(SENTINELS),
                                 (batch, mode["prompt_tokens"] - 1), generator=g)
            rows = [[BOS_ID, *r] for r in body.tolist()]
            fp32, how = our_generate(ours, rows, n, "fp32")
            peers = {"ours_fp32": fp32, "ours_int8": our_generate(int8, rows, n, "fp32")[0],
                     "hf_fp32": hf_generate(hf, rows, n, False)}
            if args.bf16:
                peers.update(ours_bf16=our_generate(ours, rows, n, "bf16")[0], hf_bf16=hf_generate(hf, rows, n, True))
            counts = {k: f() for k, f in peers.items()}  # warm-up, and the number of tokens each generates
            r: dict = {"config": name, "batch": batch, "new_tokens": n, "prompt_tokens": mode["prompt_tokens"],
                       "ours_bf16_via": how, "generated_tokens": counts}
            with recording_load(r):
                secs = interleave(peers, mode["rounds"])
            tps = {k: counts[k] / median(v) for k, v in secs.items()}

            def rat(a, b):  # median of per-round ratios of tokens/s (each peer's count is fixed)
                return paired_ratio([counts[a] / t for t in secs[a]], [counts[b] / t for t in secs[b]])

            r.update({f"{k}_tokens_per_s": v for k, v in tps.items()})
            r.update({"ours_fp32_vs_hf_fp32": rat("ours_fp32", "hf_fp32"),
                      "ours_int8_vs_ours_fp32": rat("ours_int8", "ours_fp32"),
                      "ours_int8_vs_hf_fp32": rat("ours_int8", "hf_fp32"), "rounds_seconds": secs})
            if args.bf16:
                r.update({"ours_bf16_vs_ours_fp32": rat("ours_bf16", "ours_fp32"),
                          "ours_bf16_vs_hf_bf16": rat("ours_bf16", "hf_bf16")})
            print(f"   {name}, batch {batch}: ours fp32 {tps['ours_fp32']:,.0f} / int8 {tps['ours_int8']:,.0f}, "
                  f"transformers fp32 {tps['hf_fp32']:,.0f} tok/s; ours/tf {r['ours_fp32_vs_hf_fp32']:.2f}x, "
                  f"int8/fp32 {r['ours_int8_vs_ours_fp32']:.2f}x (load {r['load_average']['after'][:1]})", flush=True)
            results.append(r)
        del ours, int8, hf
    report["generate"] = results


def table(r: dict) -> str:
    rows = []
    for s in r["generate"]:
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        row = [f"{s['config']}, batch {s['batch']}", f"{s['ours_fp32_tokens_per_s']:,.0f}",
               f"{s['ours_int8_tokens_per_s']:,.0f}", f"{s['hf_fp32_tokens_per_s']:,.0f}",
               f"{s['ours_fp32_vs_hf_fp32']:.2f}x", f"{s['ours_int8_vs_hf_fp32']:.2f}x",
               f"{s['ours_int8_vs_ours_fp32']:.2f}x"]
        if "ours_bf16_vs_ours_fp32" in s:
            row += [f"{s['ours_bf16_vs_ours_fp32']:.2f}x", f"{s['ours_bf16_vs_hf_bf16']:.2f}x"]
        rows.append((*row, " -> ".join(map(str, la))))
    head = ["generate", "tokens/s ours fp32", "ours int8", "transformers fp32", "ours fp32 / tf fp32",
            "ours int8 / tf fp32", "ours int8 / fp32"]
    if r["generate"] and "ours_bf16_vs_ours_fp32" in r["generate"][0]:
        head += ["ours bf16 / fp32", "ours bf16 / tf bf16"]
    return markdown_table((*head, "load"), rows)


def arguments(ap) -> None:
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    ap.add_argument("--bf16", action="store_true", help="also ours in bf16 and transformers under bf16 autocast")


if __name__ == "__main__":
    sys.exit(run_benchmark("generate", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="2 rounds (a smoke run)"))
