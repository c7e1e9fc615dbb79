"""From a problem and a model's text to the program the sandbox runs. Pure Python, no Ray.

    completion_prompt / chat_prompt   what the model is asked (base models continue the code;
                                      instruct models get an instruction through the chat template)
    stop_strings                      where a completion-style answer ends
    solution_from_completion          the code under test: prompt + truncated completion, or the
                                      code extracted from a fenced or bare chat answer
    build_program                     the code under test + the benchmark's tests as one program
                                      whose exit status is the verdict (0 = every test passed)

Test programs by `Problem.test_type`:
    check       solution, the problem's `check(candidate)` function, `check(entry_point)`
    asserts     solution followed by the bare asserts
    diff        EvalPlus: candidate and canonical solution run side by side on every input;
                outputs compared exactly, floats with the problem's atol
    stdio       LiveCodeBench stdin/stdout: each test runs the solution as its own process with the
                test input on stdin; stdout compared line by line (sandbox.compare.stdout_matches)
    functional  LiveCodeBench LeetCode-style: `Solution().<func_name>(*args)` against the output
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Optional

from domino_ray.evaluate.benchmarks import Problem
from domino_ray.sandbox.compare import stdout_matches

__all__ = [
    "CODE_STOPS",
    "TEXT_STOPS",
    "completion_prompt",
    "chat_prompt",
    "stop_strings",
    "truncate_at_stops",
    "extract_code",
    "solution_from_completion",
    "reference_solution",
    "build_program",
]

# The Codex paper's stops for function completion: the next top-level statement ends the function.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
TEXT_STOPS = ("```",)  # statement problems: the prompt opens a fence, its end ends the program

# LiveCodeBench's grader gives solutions these names without imports; kept for comparable scores.
_LCB_PRELUDE_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                        "statistics", "itertools", "functools", "operator", "io", "sys", "json")
LCB_PRELUDE = "".join(f"from {m} import *\n" for m in _LCB_PRELUDE_MODULES) + "from typing import *\n" + \
    "".join(f"import {m}\n" for m in _LCB_PRELUDE_MODULES) + "sys.setrecursionlimit(50000)\n"

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", re.S | re.I)
_CODE_START = re.compile(r"^(def |class |import |from |@|async def |if __name__)", re.M)


# ---------------------------------------------------------------------------------------- prompts
def _statement_with_format(p: Problem) -> str:
    starter = p.meta.get("starter_code") or ""
    if starter:
        fmt = f"Complete this starter code; keep its class and method names:\n```python\n{starter.rstrip()}\n```"
    elif p.test_type == "stdio":
        fmt = "Write a complete program that reads the input from stdin and writes the answer to stdout."
    elif p.entry_point:
        fmt = f"Write a Python function named `{p.entry_point}`."
    else:
        fmt = "Write a Python program."
    return f"{p.prompt.strip()}\n\n{fmt}"


def completion_prompt(p: Problem) -> str:
    """Prompt for base models: code problems are continued as-is; statements are followed by an
    opened Python fence (with the starter code, if any) that the model completes."""
    if p.prompt_kind == "code":
        return p.prompt
    starter = p.meta.get("starter_code") or ""
    return f"{_statement_with_format(p)}\n\n```python\n{starter}"


def chat_prompt(p: Problem) -> str:
    """User message for instruct models (the engine applies the chat template)."""
    if p.prompt_kind == "code":
        return ("Complete the following Python function. Answer with the whole function, including the "
                f"signature and any imports it needs, in one ```python code block.\n\n```python\n{p.prompt.rstrip()}\n```")
    return (f"Solve the following programming problem in Python.\n\n{_statement_with_format(p)}\n\n"
            "Answer with one ```python code block.")


def stop_strings(p: Problem, style: str) -> list[str]:
    if style == "chat":
        return []
    return list(CODE_STOPS if p.prompt_kind == "code" else TEXT_STOPS)


# ------------------------------------------------------------------------------------ extraction
def truncate_at_stops(text: str, stops) -> str:
    """`text` up to the earliest stop string (engines may or may not have stopped there)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _defines(code: str, entry_point: Optional[str]) -> bool:
    if not entry_point:
        return False
    return bool(re.search(rf"(^|\n)\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code)) or "class Solution" in code


def extract_code(response: str, entry_point: Optional[str] = None) -> str:
    """The Python code in a model answer: the fenced block that defines `entry_point` (else the
    longest Python block); an unclosed fence (answer cut by max_tokens) to the end; otherwise the
    bare answer from its first line of code."""
    blocks = [code for lang, code in _FENCE.findall(response) if lang.lower() in ("", "python", "py", "python3")]
    if blocks:
        for code in blocks:
            if _defines(code, entry_point):
                return code
        return max(blocks, key=len)
    rest = _FENCE.sub("", response)  # closed non-Python blocks (shell, output) are not the answer
    m = _OPEN_FENCE.search(rest)
    if m:
        return m.group(1)
    start = _CODE_START.search(rest)
    return rest[start.start():] if start else rest.lstrip("\n")


def solution_from_completion(p: Problem, completion: str, style: str) -> str:
    """The code under test (tests not included) for one model output."""
    completion = completion or ""
    if style == "completion":
        if p.prompt_kind == "code":
            return p.prompt + truncate_at_stops(completion, CODE_STOPS)
        starter = p.meta.get("starter_code") or ""
        return extract_code(starter + truncate_at_stops(completion, TEXT_STOPS), p.entry_point)
    code = extract_code(completion, p.entry_point)
    if p.prompt_kind == "code":
        # The prompt stays in front: its imports and helper functions are part of the problem. A
        # full redefinition of the entry point replaces the prompt's docstring-only stub.
        return p.prompt + ("\n\n" if _defines(code, p.entry_point) else "") + code
    return code


def reference_solution(p: Problem) -> Optional[str]:
    """The canonical solution as code under test (None when the benchmark ships none)."""
    if p.canonical_solution is None:
        return None
    if p.prompt_kind == "code" or p.test_type == "diff":
        return p.prompt + p.canonical_solution  # HumanEval: a body; MBPP+: a docstring + full code
    return p.canonical_solution


# -------------------------------------------------------------------------------------- programs
def _literal(value) -> str:
    """A Python literal of JSON data (json.loads inside the program; repr keeps it one token)."""
    return repr(json.dumps(value))


_DIFF_HARNESS = '''
import copy as _copy, json as _json, math as _math

_INPUTS = _json.loads({inputs})
_ATOL = {atol!r}
_ENTRY = {entry!r}
# EvalPlus oracles: outputs compared as sets, or only for being not None
_SET_EQUAL = {{"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
               "intersection_array", "find_dissimilar", "Diff"}}
_NOT_NONE = {{"check_str", "text_match_three", "text_starta_endb"}}

def _load(source):
    namespace = {{"__name__": "__domino_solution__"}}
    exec(compile(source, "<solution>", "exec"), namespace)
    return namespace[_ENTRY]

def _is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, float) for i in x)

def _close(a, b, atol):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, atol) for x, y in zip(a, b))
    try:
        return abs(float(a) - float(b)) <= atol + 1e-7 * abs(float(b))
    except (TypeError, ValueError):
        return False

def _same(out, expected, args):
    if _ENTRY == "find_zero":  # any root will do
        return abs(sum(c * _math.pow(out, i) for i, c in enumerate(args[0]))) <= max(_ATOL, 1e-6)
    if _ENTRY in _NOT_NONE:
        return (out is None) == (expected is None)
    if _ENTRY in _SET_EQUAL:
        try:
            return set(out) == set(expected)
        except TypeError:
            return False
    if out == expected:
        return True
    atol = _ATOL if _ATOL or not _is_floats(expected) else 1e-6
    return bool(atol) and _close(out, expected, atol)

_reference = _load(_REFERENCE)
_candidate = _load(_SOLUTION)
_checked = 0
for _i, _args in enumerate(_INPUTS):
    try:
        _expected = _reference(*_copy.deepcopy(_args))
    except Exception:
        continue  # an input the reference rejects says nothing about the candidate
    _out = _candidate(*_copy.deepcopy(_args))
    assert _same(_out, _expected, _args), f"input {{_i}}: wrong output"
    _checked += 1
print(f"passed {{_checked}} of {{len(_INPUTS)}} inputs")
'''

_STDIO_HARNESS = '''
import json as _json, subprocess as _subprocess, sys as _sys

_TESTS = _json.loads({tests})
_PER_TEST_S = {per_test!r}
# the solution runs like this harness: same interpreter, same flags (-S when site-packages are off)
_COMMAND = [_sys.executable, "-I", "-B"] + (["-S"] if _sys.flags.no_site else []) + ["solution.py"]

{compare}

with open("solution.py", "w") as _f:
    _f.write(_PRELUDE + _SOLUTION)
for _i, _test in enumerate(_TESTS):
    with open("input.txt", "w") as _f:
        _f.write(_test["input"])
    with open("input.txt") as _fin, open("output.txt", "w") as _fout, open("error.txt", "w") as _ferr:
        try:
            _proc = _subprocess.run(_COMMAND, stdin=_fin, stdout=_fout,
                                    stderr=_ferr, timeout=_PER_TEST_S)
        except _subprocess.TimeoutExpired:
            raise TimeoutError(f"test {{_i}}: time limit of {{_PER_TEST_S:g}} s exceeded") from None
    if _proc.returncode == -24:  # SIGXCPU: the test used up its CPU time
        raise TimeoutError(f"test {{_i}}: CPU time limit exceeded")
    if _proc.returncode < 0:
        raise RuntimeError(f"test {{_i}}: killed by signal {{-_proc.returncode}}")
    if _proc.returncode != 0:
        _err = [l for l in open("error.txt", errors="replace").read().splitlines() if l.strip()]
        _last = _err[-1] if _err else f"exit status {{_proc.returncode}}"
        if _last.startswith("MemoryError"):
            raise MemoryError(f"test {{_i}}")
        raise RuntimeError(f"test {{_i}}: {{_last}}")
    if not stdout_matches(open("output.txt", errors="replace").read(), _test["output"]):
        raise AssertionError(f"test {{_i}}: wrong answer")
print(f"passed {{len(_TESTS)}} tests")
'''

_FUNCTIONAL_HARNESS = '''
import json as _json, signal as _signal

_TESTS = _json.loads({tests})
_PER_TEST_S = {per_test!r}
_FUNC = {func!r}

def _on_alarm(signum, frame):
    raise TimeoutError(f"test {{_i}}: time limit of {{_PER_TEST_S:g}} s exceeded")

_namespace = {{"__name__": "__domino_solution__"}}
exec(compile(_PRELUDE + _SOLUTION, "<solution>", "exec"), _namespace)
_target = getattr(_namespace["Solution"](), _FUNC) if "Solution" in _namespace else _namespace[_FUNC]
_signal.signal(_signal.SIGALRM, _on_alarm)
for _i, _test in enumerate(_TESTS):
    _args = [_json.loads(line) for line in _test["input"].split("\\n")]
    _expected = _json.loads(_test["output"])
    _signal.setitimer(_signal.ITIMER_REAL, _PER_TEST_S)
    try:
        _out = _target(*_args)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    if isinstance(_out, tuple):
        _out = list(_out)
    assert _out == _expected, f"test {{_i}}: wrong answer"
print(f"passed {{len(_TESTS)}} tests")
'''


def build_program(p: Problem, solution: str) -> str:
    """One program that exits 0 exactly when `solution` passes every test of `p`."""
    if p.test_type == "check":
        return f"{solution}\n\n{p.tests}\n\ncheck({p.entry_point})\n"
    if p.test_type == "asserts":
        return f"{solution}\n\n{p.tests}\n"
    head = f"_SOLUTION = {solution!r}\n"
    if p.test_type == "diff":
        inputs = list(p.meta.get("base_input", [])) + list(p.meta.get("plus_input", []))
        return (head + f"_REFERENCE = {reference_solution(p)!r}\n"
                + _DIFF_HARNESS.format(inputs=_literal(inputs), atol=float(p.meta.get("atol", 0.0)), entry=p.entry_point))
    per_test = float(p.meta.get("per_test_timeout_s", 6.0))
    head += f"_PRELUDE = {LCB_PRELUDE!r}\n"
    if p.test_type == "stdio":
        return head + _STDIO_HARNESS.format(tests=_literal(p.io_tests), per_test=per_test,
                                            compare=inspect.getsource(stdout_matches))
    if p.test_type == "functional":
        return head + _FUNCTIONAL_HARNESS.format(tests=_literal(p.io_tests), per_test=per_test, func=p.entry_point)
    raise ValueError(f"problem {p.task_id}: unknown test_type {p.test_type!r}")
