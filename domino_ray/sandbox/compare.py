"""Verdicts decided outside the sandbox (DESIGN.md section 6): the sandboxed program only reports
the candidate's outputs as plain data, and the parent compares them with expected values that never
enter the sandbox.

    to_data(value)            sandbox side: a JSON-ready tree of a value built only of the exact
                              builtin types None, bool, int, float, str, list, tuple, dict, set,
                              frozenset (`type(x) is int`, not isinstance: a subclass with a forged
                              `__eq__` is refused, so it can never stand in for a right answer)
    from_data(tree)           parent side: the same value rebuilt from builtins only
    values_match(...)         parent side: one test's rule (==, is, abs(a - b) < eps, truthiness)
    evalplus_same(...)        parent side: EvalPlus's output comparison (atol, set and None oracles)
    stdout_matches(a, e)      stdin/stdout benchmarks: LiveCodeBench's line rule

`to_data`, `from_data` and `stdout_matches` are self-contained (no module globals but NotData, only
stdlib imports inside) because their source is embedded in programs: the harness that runs in the
sandbox encodes outputs with `to_data` and decodes its inputs with `from_data`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["to_data", "from_data", "values_match", "evalplus_same", "stdout_matches", "NotData"]


class NotData(TypeError):
    """An output that is not plain data (raised on the parent side for malformed trees)."""


def to_data(value, _depth=0):
    """JSON-ready tree of `value`; raises TypeError naming the first type that is not exact builtin
    data. Every container is tagged, so the parent rebuilds tuples, dicts with any keys and sets."""
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        if value != value or value in (float("inf"), float("-inf")):
            return {"f": repr(value)}
        return value
    if _depth > 200:
        raise TypeError("output nested deeper than 200 levels")
    if t is list:
        return [to_data(v, _depth + 1) for v in value]
    if t is tuple:
        return {"t": [to_data(v, _depth + 1) for v in value]}
    if t is dict:
        return {"d": [[to_data(k, _depth + 1), to_data(v, _depth + 1)] for k, v in value.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [to_data(v, _depth + 1) for v in value]}
    raise TypeError(f"output of type {t.__module__}.{t.__qualname__} is not plain data")


def from_data(tree):
    """The value `to_data` encoded, rebuilt from builtins only (NotData on a malformed tree).
    Self-contained like `to_data`: the calls harness decodes its inputs with it."""
    if tree is None or isinstance(tree, (bool, int, str)):
        return tree
    if isinstance(tree, float):
        return tree
    if isinstance(tree, list):
        return [from_data(v) for v in tree]
    if isinstance(tree, dict) and len(tree) == 1:
        (tag, body), = tree.items()
        if tag == "f" and body in ("nan", "inf", "-inf"):
            return float(body)
        if isinstance(body, list):
            if tag == "t":
                return tuple(from_data(v) for v in body)
            if tag == "d" and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
                try:
                    return {from_data(k): from_data(v) for k, v in body}
                except TypeError as e:
                    raise NotData(f"unhashable dict key: {e}") from None
            if tag in ("s", "fs"):
                try:
                    items = [from_data(v) for v in body]
                    return set(items) if tag == "s" else frozenset(items)
                except TypeError as e:
                    raise NotData(f"unhashable set element: {e}") from None
    raise NotData(f"not an encoded value: {str(tree)[:80]}")


_WRAPS = {"tuple": tuple, "list": list, "sorted": sorted, "set": set, "frozenset": frozenset}


def values_match(got: Any, expected: Any, rule: str, eps: Optional[Any] = None, wrap: Optional[str] = None) -> bool:
    """One test's verdict on plain data, with Python's own semantics of the test it stands for:
    `eq`: wrap(got) == expected, `is`: wrap(got) is expected (True/False/None), `abs_lt`/`abs_le`:
    abs(got - expected) < eps (<=), `truthy`/`falsy`: bool(got). Anything that raises is a no."""
    try:
        if wrap:
            got = _WRAPS[wrap](got)
        if rule == "eq":
            return bool(got == expected)
        if rule == "is":
            return got is expected
        if rule in ("abs_lt", "abs_le"):
            if isinstance(got, (list, tuple, dict, set, frozenset, str)):
                return False
            diff = abs(got - expected)
            return bool(diff < eps) if rule == "abs_lt" else bool(diff <= eps)
        if rule == "truthy":
            return bool(got)
        if rule == "falsy":
            return not got
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return False
    raise ValueError(f"unknown comparison rule {rule!r}")


# EvalPlus oracles: outputs compared as sets, or only for being None or not
_SET_EQUAL = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
              "intersection_array", "find_dissimilar", "Diff"}
_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


def _is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, float) for i in x)


def _close(a, b, atol: float) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
        return False
    try:
        return abs(float(a) - float(b)) <= atol + 1e-7 * abs(float(b))
    except (TypeError, ValueError, OverflowError):
        return False


def evalplus_same(out: Any, expected: Any, args: list, entry: str, atol: float) -> bool:
    """EvalPlus's comparison of a candidate's output with the reference's, on plain data."""
    try:
        if entry == "find_zero":  # any root will do
            if isinstance(out, bool) or not isinstance(out, (int, float)):
                return False
            return abs(sum(c * math.pow(out, i) for i, c in enumerate(args[0]))) <= max(atol, 1e-6)
        if entry in _NOT_NONE:
            return (out is None) == (expected is None)
        if entry in _SET_EQUAL:
            try:
                return set(out) == set(expected)
            except TypeError:
                return False
        if out == expected:
            return True
        tol = atol if atol or not _is_floats(expected) else 1e-6
        return bool(tol) and _close(out, expected, tol)
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return False


def stdout_matches(actual, expected):
    """True when `actual` stdout matches `expected` (LiveCodeBench's grader): lines compared after
    stripping, surrounding blank lines ignored, and a line that differs as text still matches when
    both parse as the same sequence of decimal numbers."""
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
