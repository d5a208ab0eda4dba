"""Benchmarks (make bench): each stage against its peer and its ceiling, side by side in one run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def run_part(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict], show: Callable[[dict], None],
    argv: list[str] | None,
) -> int:  # fmt: skip
    """A bench part's command line: its arguments parsed, the part run, its results written to --out, its table
    printed."""
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    show(result)
    return 0
