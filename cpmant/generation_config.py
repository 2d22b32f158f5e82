"""The generation settings, their defaults and their allowed ranges: one home for `generate`, the pyfunc's params
and the CLI. Imports nothing heavy (no torch), so a CLI can read the defaults when it builds its parser."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional

from .errors import CpmantError
from .precision import PRECISIONS, Precision

MAX_SEED = 2**63 - 1  # MLflow's `long`; torch.Generator.manual_seed takes it


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a text. Invalid values raise CpmantError naming every bad field, its value and its range."""

    max_new_tokens: int = 32  # most tokens generated per text (</s> ends a row earlier)
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # sample among the k likeliest tokens; 0 = no limit
    top_p: float = 1.0  # sample among the smallest set of tokens whose probability reaches top_p; 1 = no limit
    num_beams: int = 1  # > 1: beam search (deterministic; temperature, top_k and top_p stay at their defaults)
    repetition_penalty: float = 1.2  # CTRL penalty on tokens already generated; 1 = off, < 1 favours repeats
    seed: Optional[int] = 0  # seed of the sampling generator; None = torch's global generator
    precision: Precision = "auto"  # compute precision of the forward passes: auto | fp32 | bf16 (see cpmant.generate)
    stop: tuple[str, ...] = ()  # a row ends once its decoded text contains one of these; the text is cut before it

    # field -> (kind, allowed range in words, check)
    _RULES = {
        "max_new_tokens": ("int", ">= 1", lambda v: v >= 1),
        "temperature": ("float", ">= 0 (0 = greedy)", lambda v: v >= 0),
        "top_k": ("int", ">= 0 (0 = off)", lambda v: v >= 0),
        "top_p": ("float", "0 < top_p <= 1 (1 = off)", lambda v: 0 < v <= 1),
        "num_beams": ("int", ">= 1 (1 = no beam search)", lambda v: v >= 1),
        "repetition_penalty": ("float", "> 0 (1 = off)", lambda v: v > 0),
        "seed": ("int", f"0..{MAX_SEED}, or None", lambda v: 0 <= v <= MAX_SEED),
        "precision": ("choice", " | ".join(PRECISIONS) + " (auto = fp32 on the CPU, bf16 on CUDA with compute "
                      "capability 8.0 or more)", lambda v: v in PRECISIONS),
    }

    def __post_init__(self):
        problems = []
        stop = _coerce_stop(self.stop)
        if stop is None:
            problems.append(f"stop={self.stop!r} (allowed: a list of non-empty strings, or one string)")
        else:
            object.__setattr__(self, "stop", stop)
        for name, (kind, allowed, ok) in self._RULES.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if kind == "choice":
                if not isinstance(value, str) or not ok(value):
                    problems.append(f"{name}={value!r} (allowed: {allowed})")
                continue
            coerced = _coerce(value, kind)
            if coerced is None or not ok(coerced):
                problems.append(f"{name}={value!r} (allowed: {'an integer' if kind == 'int' else 'a number'} "
                                f"{allowed})")
            else:
                object.__setattr__(self, name, coerced)
        if not problems and self.num_beams > 1 and (self.temperature > 0 or self.top_k > 0 or self.top_p < 1):
            problems.append(f"num_beams={self.num_beams} with temperature={self.temperature}, top_k={self.top_k}, "
                            f"top_p={self.top_p} (beam search does not sample: with num_beams > 1 keep "
                            "temperature 0, top_k 0 and top_p 1)")
        if problems:
            raise CpmantError("invalid generation settings: " + "; ".join(problems),
                              "use values in the allowed ranges")

    @classmethod
    def from_params(cls, params: Optional[Mapping[str, Any]] = None,
                    base: Optional["GenerationConfig"] = None) -> "GenerationConfig":
        """`base` (default: the defaults) with the given fields replaced; an unknown name is an error."""
        base = base if base is not None else cls()
        params = dict(params or {})
        unknown = sorted(set(params) - set(cls.field_names()))
        if unknown:
            raise CpmantError(f"unknown generation setting(s): {', '.join(map(str, unknown))}",
                              f"use only: {', '.join(cls.field_names())}")
        return replace(base, **params) if params else base

    @classmethod
    def allowed(cls, name: str) -> str:
        """The allowed values of a field in words (for help texts): allowed("top_p") == "0 < top_p <= 1 (1 = off)"."""
        return cls._RULES[name][1]

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(GenerationConfig))

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0

    def to_params(self) -> dict[str, Any]:
        """Plain dict of every field (the pyfunc's params and their defaults); `stop` as a list (MLflow's params
        take 1-D lists, not tuples)."""
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


def _coerce_stop(value: Any) -> Optional[tuple[str, ...]]:
    """Stop strings as a tuple: one string is one stop string; None is none; anything else must be non-empty strs."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        return None
    return out if all(isinstance(x, str) and x for x in out) else None


def _coerce(value: Any, kind: str):
    """value as int / float when it is one exactly (32.0 -> 32 for an int field), else None. bool is no number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if kind == "int":
        if isinstance(value, numbers.Integral):
            return int(value)
        f = float(value)
        return int(f) if math.isfinite(f) and f.is_integer() else None
    f = float(value)
    return f if math.isfinite(f) else None
