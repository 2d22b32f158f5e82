"""Generation tokens/s: ours in fp32 and int8 (and bf16 with --bf16), and transformers' `generate` on the same weights.

Run from the repository root:  .venv/bin/python bench/bench_generate.py [--quick] [--threads N] [--bf16]
Writes bench/results/generate.json and prints a table; bench/README.md ("Generation") explains it.

Greedy decoding of max_new_tokens (64) after a prompt of 32 random token ids, batch 1 and 8, for the tiny preset and
d512-l8 (the tiny preset with dim 512, dim_ff 1536, 8 heads of 64, 8 layers), random weights. Ours:
`cpmant.generate.generate_ids` (KV cache) in fp32, and the int8 model of the same weights
(`cpmant.compress.methods.quantize.quantize_model`, run through the int8 kernel); with --bf16 also ours in bf16 and
transformers under bf16 autocast. transformers: CpmAntForCausalLM.generate (its KV cache) in fp32, loaded with
to_hf_state_dict of our weights (the same weights as `cpmant convert --to hf` writes). The peers take turns round
after round; ratios are medians of per-round ratios. Tokens/s counts the tokens each one actually generated (ours
stops at </s>, which random weights rarely choose).

Beside the peer, the limit (bench/_limits.py), measured in the same run: at batch 1 (also d1024-l4: dim 1024,
dim_ff 3072, 16 heads of 64, 4 layers), decoding tokens/s (the time of max_new_tokens minus the time of 1, i.e.
without the prefill) against the weight-bandwidth roofline: the best read bandwidth sampled through the run over
the bytes of weights read per token (fp32 and int8 each their own); for the tiny preset (its weights fit in the
last-level cache) the per-token overhead, time per token minus the roofline's, against transformers'. With
--profile (or in a full run, where a target is missed) the batch-1 decode is profiled: top ops by self CPU time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, markdown_table, median, paired_ratio, recording_load, run_benchmark  # noqa: E402
from _limits import (  # noqa: E402
    cpu_flags, last_level_cache_bytes, overhead_per_token_s, read_bandwidth, roofline_tokens_per_s, weight_bytes,
)

# issue 19's targets at batch 1: >= 75% of the roofline where the weights exceed the last-level cache, int8 >= 1.8x
# fp32 from d512 up, and on the tiny preset a per-token overhead <= 1/3 of transformers'
ROOFLINE_SHARE, INT8_SPEEDUP, OVERHEAD_SHARE = 0.75, 1.8, 1 / 3


def generate_configs():
    from cpmant.config import get_preset

    tiny = get_preset("tiny")  # vocab 8000, dim 128, 4 layers: the CPU default
    return {"tiny": tiny,
            "d512-l8": tiny.replace(dim_model=512, dim_ff=1536, num_heads=8, dim_head=64, num_layers=8),
            "d1024-l4": tiny.replace(dim_model=1024, dim_ff=3072, num_heads=16, dim_head=64, num_layers=4)}


MODES = {"full": dict(rounds=5, new_tokens=64, prompt_tokens=32, quick=False),
         "quick": dict(rounds=3, new_tokens=64, prompt_tokens=32, quick=True)}
BATCHES = {"tiny": (1, 8), "d512-l8": (1, 8), "d1024-l4": (1,)}


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


def profile_decode(run, top: int = 8) -> list[dict]:
    """Top ops by self CPU time over one call of `run` (a whole generation, so decoding dominates)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        run()
    evs = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in evs) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in evs[:top]]


def decode_rates(peers1: dict, counts: dict, secs: dict, rounds: int) -> tuple[dict, dict]:
    """Decoding tokens/s per peer without the prefill: (tokens - 1 per row) / (median time of the whole generation
    - median time of generating 1 token), the 1-token runs timed in their own interleaved rounds; and the same from
    the fastest rounds (what the machine does when other work leaves it alone, as the bandwidth sample is)."""
    first = interleave(peers1, rounds)

    def rates(stat):
        gaps = {k: stat(secs[k]) - stat(first[k]) for k in secs}  # <= 0 only when load swamped the rounds: nan
        return {k: (counts[k] - counts[k + "@1"]) / g if g > 0 else float("nan") for k, g in gaps.items()}

    return rates(median), rates(min)


def add_limits(r: dict, name: str, nbytes: dict, bandwidth: float, llc: int | None) -> None:
    """The batch-1 limits beside the figures: roofline tokens/s per weight format, shares, the tiny overhead."""
    roof = {"fp32": roofline_tokens_per_s(nbytes["fp32"], bandwidth),
            "int8": roofline_tokens_per_s(nbytes["int8"], bandwidth)}
    dec = r["decode_tokens_per_s"]
    lim = {"read_bandwidth_bytes_per_s": bandwidth, "weight_bytes": nbytes, "roofline_tokens_per_s": roof,
           "ours_fp32_of_roofline": dec["ours_fp32"] / roof["fp32"],
           "hf_fp32_of_roofline": dec["hf_fp32"] / roof["fp32"],
           "ours_int8_of_roofline": dec["ours_int8"] / roof["int8"],
           "int8_vs_fp32_decode": dec["ours_int8"] / dec["ours_fp32"],
           "weights_exceed_llc": nbytes["fp32"] > (llc or 0)}
    over = {k: overhead_per_token_s(dec[k], roof["fp32"]) for k in ("ours_fp32", "hf_fp32")}
    lim["overhead_s_per_token"] = over
    fast = r["decode_tokens_per_s_fastest"]
    lim["fastest_round"] = {"ours_fp32_of_roofline": fast["ours_fp32"] / roof["fp32"],
                            "ours_int8_of_roofline": fast["ours_int8"] / roof["int8"],
                            "overhead_ours_vs_hf": overhead_per_token_s(fast["ours_fp32"], roof["fp32"])
                            / overhead_per_token_s(fast["hf_fp32"], roof["fp32"])}
    lim["overhead_ours_vs_hf"] = over["ours_fp32"] / over["hf_fp32"] if over["hf_fp32"] > 0 else float("nan")
    met = {}
    if lim["weights_exceed_llc"]:
        met["fp32_roofline"] = lim["ours_fp32_of_roofline"] >= ROOFLINE_SHARE
        met["int8_speedup"] = lim["int8_vs_fp32_decode"] >= INT8_SPEEDUP
    if name == "tiny":
        met["overhead"] = lim["overhead_ours_vs_hf"] <= OVERHEAD_SHARE
    lim["meets"] = met
    r["limits"] = lim


def measure_config(name, config, mode: dict, args, bandwidths: list[float]) -> list[dict]:
    import torch
    from transformers import CpmAntForCausalLM

    from cpmant.compress.methods.quantize import quantize_model
    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import BOS_ID, SENTINELS, SPECIAL_TOKENS

    n, out = mode["new_tokens"], []
    torch.manual_seed(0)
    ours = CPMAnt(config).eval()
    int8 = quantize_model(ours).eval()
    hf = CpmAntForCausalLM(to_hf_config(config)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    # int8 decoding reads the tied table through its int8 pack (cpmant.decode's int8 head): 1 byte per weight, not 4
    table = int8.input_embedding.weight.numel()
    nbytes = {"fp32": weight_bytes(ours), "int8": weight_bytes(int8) - 3 * table}
    for batch in BATCHES[name]:
        g = torch.Generator().manual_seed(batch)
        body = torch.randint(len(SPECIAL_TOKENS), config.vocab_size - len(SENTINELS),
                             (batch, mode["prompt_tokens"] - 1), generator=g)
        rows = [[BOS_ID, *r] for r in body.tolist()]
        fp32, how = our_generate(ours, rows, n, "fp32")
        peers = {"ours_fp32": fp32, "ours_int8": our_generate(int8, rows, n, "fp32")[0],
                 "hf_fp32": hf_generate(hf, rows, n, False)}
        if args.bf16:
            peers.update(ours_bf16=our_generate(ours, rows, n, "bf16")[0], hf_bf16=hf_generate(hf, rows, n, True))
        peers1 = {"ours_fp32": our_generate(ours, rows, 1, "fp32")[0],
                  "ours_int8": our_generate(int8, rows, 1, "fp32")[0],
                  "hf_fp32": hf_generate(hf, rows, 1, False)} if batch == 1 else {}
        counts = {k: f() for k, f in peers.items()}  # warm-up, and the number of tokens each generates
        counts.update({k + "@1": f() for k, f in peers1.items()})
        r: dict = {"config": name, "batch": batch, "new_tokens": n, "prompt_tokens": mode["prompt_tokens"],
                   "ours_bf16_via": how, "generated_tokens": counts}
        with recording_load(r):
            bandwidths.append(read_bandwidth())
            secs = interleave(peers, mode["rounds"])
            if peers1:
                r["decode_tokens_per_s"], r["decode_tokens_per_s_fastest"] = decode_rates(
                    peers1, counts, {k: secs[k] for k in peers1}, mode["rounds"])
        tps = {k: counts[k] / median(v) for k, v in secs.items()}

        def rat(a, b):  # median of per-round ratios of tokens/s (each peer's count is fixed)
            return paired_ratio([counts[a] / t for t in secs[a]], [counts[b] / t for t in secs[b]])

        r.update({f"{k}_tokens_per_s": v for k, v in tps.items()})
        r.update({"ours_fp32_vs_hf_fp32": rat("ours_fp32", "hf_fp32"),
                  "ours_int8_vs_ours_fp32": rat("ours_int8", "ours_fp32"),
                  "ours_int8_vs_hf_fp32": rat("ours_int8", "hf_fp32"), "rounds_seconds": secs,
                  "weight_bytes": nbytes})
        if args.bf16:
            r.update({"ours_bf16_vs_ours_fp32": rat("ours_bf16", "ours_fp32"),
                      "ours_bf16_vs_hf_bf16": rat("ours_bf16", "hf_bf16")})
        if batch == 1 and (args.profile or not mode["quick"]):
            r["profile"] = {k: profile_decode(peers[k]) for k in ("ours_fp32", "ours_int8", "hf_fp32")}
        print(f"   {name}, batch {batch}: ours fp32 {tps['ours_fp32']:,.0f} / int8 {tps['ours_int8']:,.0f}, "
              f"transformers fp32 {tps['hf_fp32']:,.0f} tok/s; ours/tf {r['ours_fp32_vs_hf_fp32']:.2f}x, "
              f"int8/fp32 {r['ours_int8_vs_ours_fp32']:.2f}x (load {r['load_average']['after'][:1]})", flush=True)
        out.append(r)
    return out


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    llc = last_level_cache_bytes()
    report["meta"].update(torch_threads=torch.get_num_threads(), last_level_cache_bytes=llc)
    results, bandwidths = [], []
    for name, config in generate_configs().items():
        results += measure_config(name, config, mode, args, bandwidths)
    bandwidths.append(read_bandwidth())
    for r in results:  # the best bandwidth sample of the run: a low one (a busy moment) would flatter every share
        if "decode_tokens_per_s" in r:
            add_limits(r, r["config"], r["weight_bytes"], max(bandwidths), llc)
    report["meta"].update(read_bandwidth_samples=bandwidths, read_bandwidth_bytes_per_s=max(bandwidths))
    report["generate"] = results


def table(r: dict) -> str:
    rows, lim_rows = [], []
    for s in r["generate"]:
        la = " -> ".join(map(str, s["load_average"]["before"][:1] + s["load_average"]["after"][:1]))
        row = [f"{s['config']}, batch {s['batch']}", f"{s['ours_fp32_tokens_per_s']:,.0f}",
               f"{s['ours_int8_tokens_per_s']:,.0f}", f"{s['hf_fp32_tokens_per_s']:,.0f}",
               f"{s['ours_fp32_vs_hf_fp32']:.2f}x", f"{s['ours_int8_vs_hf_fp32']:.2f}x",
               f"{s['ours_int8_vs_ours_fp32']:.2f}x"]
        if "ours_bf16_vs_ours_fp32" in s:
            row += [f"{s['ours_bf16_vs_ours_fp32']:.2f}x", f"{s['ours_bf16_vs_hf_bf16']:.2f}x"]
        rows.append((*row, la))
        if "limits" in s:
            lim, dec = s["limits"], s["decode_tokens_per_s"]
            roof, over = lim["roofline_tokens_per_s"], lim["overhead_s_per_token"]
            mb = lim["weight_bytes"]
            lim_rows.append((s["config"], f"{mb['fp32'] / 1e6:.1f} / {mb['int8'] / 1e6:.1f}",
                             f"{dec['ours_fp32']:,.0f} / {roof['fp32']:,.0f} = {lim['ours_fp32_of_roofline']:.0%}",
                             f"{dec['ours_int8']:,.0f} / {roof['int8']:,.0f} = {lim['ours_int8_of_roofline']:.0%}",
                             f"{dec['hf_fp32']:,.0f} = {lim['hf_fp32_of_roofline']:.0%}",
                             f"{lim['int8_vs_fp32_decode']:.2f}x",
                             f"{over['ours_fp32'] * 1e3:.2f} / {over['hf_fp32'] * 1e3:.2f} ms = "
                             f"{lim['overhead_ours_vs_hf']:.2f}",
                             ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in lim["meets"].items()) or "-", la))
    head = ["generate", "tokens/s ours fp32", "ours int8", "transformers fp32", "ours fp32 / tf fp32",
            "ours int8 / tf fp32", "ours int8 / fp32"]
    if r["generate"] and "ours_bf16_vs_ours_fp32" in r["generate"][0]:
        head += ["ours bf16 / fp32", "ours bf16 / tf bf16"]
    meta = r["meta"]
    return (markdown_table((*head, "load"), rows) + "\n\n" + markdown_table(
        ("batch 1, decode", "weights MB fp32 / int8", "ours fp32 / roofline", "ours int8 / roofline",
         "transformers fp32", "int8 / fp32", "overhead per token ours / tf", "targets met", "load"), lim_rows)
        + f"\n\nread bandwidth {meta['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (best of the run), last-level "
          f"cache {(meta['last_level_cache_bytes'] or 0) / 2**20:.0f} MiB, "
          f"CPU flags {' '.join(meta.get('cpu_flags') or cpu_flags())}")


def arguments(ap) -> None:
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    ap.add_argument("--bf16", action="store_true", help="also ours in bf16 and transformers under bf16 autocast")
    ap.add_argument("--profile", action="store_true", help="profile the batch-1 decode also in a --quick run")


if __name__ == "__main__":
    sys.exit(run_benchmark("generate", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="3 rounds, no profile unless --profile (a smoke run)"))
