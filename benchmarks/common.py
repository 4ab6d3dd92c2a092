"""Shared helpers for the benchmark scripts: medians, tables, the final JSON line."""
from __future__ import annotations

import json
import statistics
import sys
from typing import Iterable


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def emit(result: dict) -> None:
    """The last line of every benchmark is one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result))
