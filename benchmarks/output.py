"""Where a benchmark's result goes, and the check that it is well-formed before anyone plots or quotes it.

Standard library only: plots.py and the drivers that run no torch import it too.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "ckptbus-bench-smoke"
"""Where ``--smoke`` results go unless ``--out`` says otherwise: never over the published ones."""


def add_smoke_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps, rounds and bytes: every arm end to end and the result checked, "
        f"written under {SMOKE_RESULTS} unless --out is given (what CI runs)",
    )


def default_out(name: str, smoke: bool) -> str:
    """The result file of benchmark ``name``: benchmarks/results/NAME.json, or a temporary one for a smoke run."""
    return str((SMOKE_RESULTS if smoke else RESULTS) / f"{name}.json")


Key = str | tuple[str, ...]
"""A key of a result: ``"a.b"`` for ``result["a"]["b"]``, or the tuple ``("a", "b")`` where a key holds a dot."""


def problems(result: dict[str, Any], required: Iterable[Key]) -> list[str]:
    """What makes ``result`` malformed: a ``required`` key missing or null, a number that is not finite anywhere in
    it (NaN or infinity: a division by zero or an empty median upstream)."""
    found: list[str] = []
    for key in required:
        parts = key.split(".") if isinstance(key, str) else key
        value: Any = result
        for part in parts:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            found.append(f"{'.'.join(parts)}: missing")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where}: {value}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(result, "")
    return found


def write_result(path: str | Path, result: dict[str, Any], required: Iterable[Key]) -> Path:
    """Write ``result`` as JSON to ``path``, then check it: raises SystemExit naming every problem.

    Written first, so that a long run that ends malformed still leaves what
    it measured for a look.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    found = problems(result, required)
    if found:
        raise SystemExit(f"{out}: the result is malformed:\n  " + "\n  ".join(found))
    return out
