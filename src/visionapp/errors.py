"""Errors a person can read: a problem with what the user gave (their data, a config value, a run folder) is a
`UserError` whose message names the thing and the fix; entry points print it as one `error: ...` line and exit
with status 2, with no traceback. VISIONAPP_DEBUG=1 (or `--debug` on the training CLI) shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USAGE_EXIT = 2  # as argparse and make's usage lines: the input was wrong, not the program


class UserError(Exception):
    """Bad input from the user; the message says which and how to fix it."""


def debugging(argv: list[str] | None = None) -> bool:
    """Whether to show tracebacks: VISIONAPP_DEBUG set (not 0), or --debug among the arguments."""
    return os.environ.get("VISIONAPP_DEBUG", "0") not in ("", "0") or "--debug" in (argv or [])


def run_main(main: Callable[[], int | None], *, debug: bool | None = None) -> int:
    """Call an entry point; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main() or 0
    except UserError as e:
        if debugging() if debug is None else debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
