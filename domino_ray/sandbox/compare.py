"""Comparison of a program's stdout with the expected output, the rule stdin/stdout benchmarks use
(LiveCodeBench's grader): lines compared after stripping, surrounding blank lines ignored, and a
line that differs as text still matches when both parse as the same sequence of decimal numbers.

`stdout_matches` imports only `decimal` and is self-contained on purpose: the evaluation harness
embeds its source in programs that run inside the sandbox, so host and sandbox judge alike.
"""

from __future__ import annotations

__all__ = ["stdout_matches"]


def stdout_matches(actual, expected):
    """True when `actual` stdout matches `expected` line by line (see the module docstring)."""
    from decimal import Decimal, InvalidOperation

    got = [line.strip() for line in str(actual).strip().split("\n")]
    want = [line.strip() for line in str(expected).strip().split("\n")]
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        try:
            if [Decimal(t) for t in g.split()] != [Decimal(t) for t in w.split()]:
                return False
        except (InvalidOperation, ValueError):
            return False
    return True
