"""The ``ckptbus`` command (filled in by the socket/CLI work). Imports no torch."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("ckptbus: no commands yet", file=sys.stderr)
    return 2
