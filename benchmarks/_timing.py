"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int = 5, number: int = 1) -> float:
    """Best wall time in seconds of ``number`` calls, over ``repeat`` rounds (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def report(rows: list[tuple[str, float, float]], unit: str = "ms") -> None:
    """Print ``name, baseline, handseg, speed-up`` as a Markdown table."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    print(f"| job | baseline ({unit}) | handseg ({unit}) | speed-up |")
    print("|---|---:|---:|---:|")
    for name, base, ours in rows:
        print(f"| {name} | {base * scale:.2f} | {ours * scale:.2f} | {base / ours:.1f}x |")
