"""`python -m cpmant.training --config resolved.yaml`: the torchrun entry point of the torch backend.

Rank 0 writes the TrainResult as JSON to `--result` (default: <run_dir>/result.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..configio import build_config, parse_overrides
from ..errors import CpmantError
from ..fsutil import atomic_write_text
from .config import PretrainConfig
from .loop import pretrain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cpmant.training", description=__doc__)
    ap.add_argument("--config", help="PretrainConfig YAML")
    ap.add_argument("--result", help="where rank 0 writes the result JSON")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides")
    args = ap.parse_args(argv)
    try:
        cfg = build_config(PretrainConfig, args.config, parse_overrides(args.overrides))
        res = pretrain(cfg, progress=not args.no_progress)
    except CpmantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(args.result) if args.result else res.run_dir / "result.json"
        atomic_write_text(out, json.dumps(res.to_json(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
