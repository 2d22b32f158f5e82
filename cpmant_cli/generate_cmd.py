"""`cpmant generate`: continue texts with a registered model (runs no flow and records nothing)."""

from __future__ import annotations

import argparse


def _generation_config(args):
    """The generation settings given on the command line over GenerationConfig's defaults, checked by it."""
    from cpmant.generation_config import GenerationConfig

    return GenerationConfig.from_params({k: getattr(args, k) for k in GenerationConfig.field_names()
                                         if getattr(args, k, None) is not None})


def cmd_generate(args) -> int:
    from cpmant.checkpoint import load_pretrained
    from cpmant.generate import generate
    from registry.pulling import checkpoint_dir

    gen = _generation_config(args)  # bad settings fail before the model is fetched
    model, tok = load_pretrained(checkpoint_dir(args.uri))
    outs = generate(model, tok, args.text, gen)
    for text, out in zip(args.text, outs):
        print(f"{text}{out}")
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """One flag per GenerationConfig field, with its default; GenerationConfig checks the values and their mix."""
    from cpmant.generation_config import PRECISIONS, GenerationConfig

    d = GenerationConfig()
    helps = {"max_new_tokens": "tokens to add (1 or more)", "temperature": "0 = greedy; more = more random",
             "top_k": "sample among the k likeliest tokens (0 = no limit)",
             "top_p": "sample among the likeliest tokens up to this probability, in (0, 1] (1 = no limit)",
             "num_beams": "beam search width (1 = none)", "repetition_penalty": "1 = off; above 1 discourages repeats",
             "seed": "seed of the sampling generator",
             "precision": "compute precision: auto (fp32 on the CPU, where decoding is faster in fp32; bf16 on "
                          "CUDA with compute capability 8.0+), fp32 or bf16"}
    for name in GenerationConfig.field_names():
        default = getattr(d, name)
        if isinstance(default, str):  # a choice (precision): GenerationConfig checks it and names the choices
            p.add_argument("--" + name.replace("_", "-"), default=None, metavar="|".join(PRECISIONS),
                           help=f"{helps.get(name, name)} (default: {default})")
            continue
        kind = int if isinstance(default, int) or name == "seed" else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper(),
                       help=f"{helps.get(name, name)} (default: {default})")


def add_verbs(sub) -> None:
    p = sub.add_parser("generate", help="continue a text with a registered model")
    p.add_argument("uri", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint folder")
    p.add_argument("text", nargs="+", help="prompt text(s)")
    _add_generation_args(p)
    p.set_defaults(fn=cmd_generate)
