"""From a problem and a model's text to the programs the sandbox runs. Pure Python, no Ray.

    completion_prompt / chat_prompt   what the model is asked (base models continue the code;
                                      instruct models get an instruction through the chat template)
    stop_strings                      where a completion-style answer ends
    solution_from_completion          the code under test: prompt + truncated completion, or the
                                      code extracted from a fenced or bare chat answer
    *_program                         the sandboxed programs; verdicts come from
                                      `evaluate.verdict.judge_solution`, in the parent process

Data programs (the verdict is decided outside the sandbox; no expected value is inside them):
    calls_program       HumanEval `check` / bare asserts read as data: the function under test on
                        each test's call, outputs reported as plain data (sandbox.compare.to_data)
    expected_program    the tests' own expected values and tolerances, and the reference
                        solution's outputs (run once per problem, cached by the parent)
    inputs_program      EvalPlus: a solution on every input (the candidate, or the reference)
    functional_program  LiveCodeBench LeetCode-style: `Solution().<func_name>(*args)` per test
    stdio_program       LiveCodeBench stdin/stdout: each test runs the solution as its own process
                        with the input on stdin; its stdout comes back
Assert program (where tests cannot be read as data, and for self-written tests):
    assert_program      code under test (`__main__` blocks removed) + tests + a completion marker
    build_program       assert_program of a `check` or `asserts` problem

Every program opens with CHANNEL: a token drawn inside the sandbox and printed first, which tags
the harness's final report; `verdict.read_report` accepts only a report with that token.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Optional

from domino_ray.evaluate.benchmarks import Problem

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
# Every program starts with this channel, before any code under test runs: a token drawn inside
# the sandbox (os.urandom, never in a file, never in stdin) is written to stdout first, and the
# harness's report at the end is tagged with it. The code under test runs in its own namespace and
# cannot name `_domino_emit`; reaching the token means reaching the harness's objects through
# frames, gc, __main__ or /proc, which the assert path refuses statically (checks.refusal).
CHANNEL = '''import os as _domino_os
def _domino_channel():
    write, token = _domino_os.write, _domino_os.urandom(16).hex()
    write(1, ("DOMINO-START " + token + "\\n").encode())
    def emit(text):
        write(1, ("\\nDOMINO-" + token + " " + text + "\\n").encode())
    return emit
_domino_emit = _domino_channel()
del _domino_channel
'''


def _literal(value) -> str:
    """A Python literal of JSON data (json.loads inside the program; repr keeps it one token)."""
    return repr(json.dumps(value))


_DATA_COMMON = '''
import copy as _copy, json as _json, sys as _sys
{to_data}
_to_data = to_data

class _Discard:  # the candidate's prints are not the answer (and must not flood the channel)
    def write(self, s):
        return len(s)
    def flush(self):
        pass

def _error(e):
    try:
        return f"{{type(e).__name__}}: {{str(e)[:300]}}"
    except BaseException:
        return "exception"

def _record(fn):
    """{{"v": output as data}} | {{"bad": why it is not data}} | {{"x": the exception}}"""
    try:
        value = fn()
    except BaseException as e:  # SystemExit too: an exit is not an answer
        return {{"x": _error(e)}}
    try:
        return {{"v": _to_data(value)}}
    except BaseException as e:
        return {{"bad": _error(e)}}

def _load(source, entry):
    namespace = {{"__name__": "__domino_solution__"}}
    exec(compile(source, "<solution>", "exec"), namespace)
    if entry not in namespace:
        raise NameError(f"name {{entry!r}} is not defined")
    return namespace

_report = {{"results": []}}
_out, _err = _sys.stdout, _sys.stderr
_sys.stdout = _sys.stderr = _Discard()
'''

# HumanEval check / bare asserts as data: the function under test on each test's arguments (plain
# data computed by the expected-values program), nothing else.
_CALLS_HARNESS = '''
{from_data}
_SOLUTION = {solution!r}
_ENTRY = {entry!r}
_CALLS = _json.loads({calls})
try:
    _candidate = _load(_SOLUTION, _ENTRY)[_ENTRY]
except BaseException as e:
    _report["load"] = _error(e)
else:
    for _call in _CALLS:
        _args, _kwargs = from_data(_call)
        _rec = _record(lambda: _candidate(*_args, **_kwargs))
        _report["results"].append(_rec)
        if "v" not in _rec:
            break
_domino_emit(_json.dumps(_report))
'''

# The expected side of HumanEval-style tests: each call's arguments as data (evaluated once, so both
# sides see the same inputs), the tests' own expected values and tolerances, evaluated where the
# tests would see them, and the reference solution's outputs as a check of the reading.
_EXPECTED_HARNESS = '''
_REFERENCE = {reference!r}
_ENTRY = {entry!r}
_SETUP = {setup!r}
_TESTS = {tests!r}
_ns = {{"__name__": "__domino_reference__"}}
if _REFERENCE is not None:
    exec(compile(_REFERENCE, "<reference>", "exec"), _ns)
exec(_SETUP, _ns)
_capture = lambda *args, **kwargs: (args, kwargs)
for _t in _TESTS:
    _rec = {{"a": _record(lambda: eval(_t["call"], dict(_ns, candidate=_capture)))}}
    for _key, _src in (("e", _t["expected"]), ("eps", _t["eps"])):
        if _src is not None:
            _rec[_key] = _record(lambda: eval(_src, _ns))
    if _REFERENCE is not None and _ENTRY in _ns and "v" in _rec["a"]:
        _args, _kwargs = eval(_t["call"], dict(_ns, candidate=_capture))
        _rec["r"] = _record(lambda: _ns[_ENTRY](*_args, **_kwargs))
    _report["results"].append(_rec)
_domino_emit(_json.dumps(_report))
'''

# EvalPlus inputs: the solution (candidate or reference, the same program) on every input.
_INPUTS_HARNESS = '''
_SOLUTION = {solution!r}
_ENTRY = {entry!r}
_INPUTS = _json.loads({inputs})
_STOP_AT_EXCEPTION = {stop!r}
try:
    _candidate = _load(_SOLUTION, _ENTRY)[_ENTRY]
except BaseException as e:
    _report["load"] = _error(e)
else:
    for _args in _INPUTS:
        _rec = _record(lambda: _candidate(*_copy.deepcopy(_args)))
        _report["results"].append(_rec)
        if _STOP_AT_EXCEPTION and "x" in _rec:
            break
_domino_emit(_json.dumps(_report))
'''

# LiveCodeBench LeetCode-style: Solution().<func>(*args) per test, with a per-test time limit.
_FUNCTIONAL_HARNESS = '''
import signal as _signal
_SOLUTION = {solution!r}
_PRELUDE = {prelude!r}
_FUNC = {func!r}
_INPUTS = _json.loads({inputs})
_PER_TEST_S = {per_test!r}

def _on_alarm(signum, frame):
    raise TimeoutError(f"time limit of {{_PER_TEST_S:g}} s exceeded")

try:
    _namespace = {{"__name__": "__domino_solution__"}}
    exec(compile(_PRELUDE + _SOLUTION, "<solution>", "exec"), _namespace)
    _target = getattr(_namespace["Solution"](), _FUNC) if "Solution" in _namespace else _namespace[_FUNC]
except BaseException as e:
    _report["load"] = _error(e)
else:
    _signal.signal(_signal.SIGALRM, _on_alarm)
    for _input in _INPUTS:
        _args = [_json.loads(line) for line in _input.split("\\n")]
        def _call():
            _signal.setitimer(_signal.ITIMER_REAL, _PER_TEST_S)
            try:
                return _target(*_args)
            finally:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
        _rec = _record(_call)
        _report["results"].append(_rec)
        if "v" not in _rec:
            break
_domino_emit(_json.dumps(_report))
'''

# LiveCodeBench stdin/stdout: each test runs the solution as its own process; its stdout comes
# back as data. The harness stops at the first crash or timeout (which needs no expected output).
_STDIO_HARNESS = '''
import json as _json, subprocess as _subprocess, sys as _sys
_SOLUTION = {solution!r}
_PRELUDE = {prelude!r}
_INPUTS = _json.loads({inputs})
_PER_TEST_S = {per_test!r}
_CAP = {cap!r}
# the solution runs like this harness: same interpreter, same flags (-S when site-packages are off)
_COMMAND = [_sys.executable, "-I", "-B"] + (["-S"] if _sys.flags.no_site else []) + ["solution.py"]
_report = {{"results": []}}
with open("solution.py", "w") as _f:
    _f.write(_PRELUDE + _SOLUTION)
for _input in _INPUTS:
    with open("input.txt", "w") as _f:
        _f.write(_input)
    _rec = {{"rc": None, "timeout": False}}
    with open("input.txt") as _fin, open("output.txt", "w") as _fout, open("error.txt", "w") as _ferr:
        try:
            _rec["rc"] = _subprocess.run(_COMMAND, stdin=_fin, stdout=_fout, stderr=_ferr,
                                         timeout=_PER_TEST_S).returncode
        except _subprocess.TimeoutExpired:
            _rec["timeout"] = True
    with open("output.txt", errors="replace") as _f:
        _text = _f.read(_CAP + 1)
    _rec["out"], _rec["truncated"] = _text[:_CAP], len(_text) > _CAP
    _lines = [l for l in open("error.txt", errors="replace").read()[-4000:].splitlines() if l.strip()]
    _rec["err"] = _lines[-1][:300] if _lines else ""
    _report["results"].append(_rec)
    if _rec["timeout"] or _rec["rc"] != 0:
        break
_domino_emit(_json.dumps(_report))
'''

# Assert-style tests: the code under test, then the tests, then the completion marker. The tests
# run in their own namespace: the code's functions and classes, but none of its names that shadow
# builtins (`abs = lambda x: 0` cannot make `abs(f(x) - y) < eps` true); `check(candidate)` tests
# see the benchmark's prompt helpers (HumanEval/32's `poly`), not the code's redefinitions of them.
_ASSERT_HARNESS = '''
import builtins as _domino_builtins
_SOLUTION = {solution!r}
_TESTS = {tests!r}
_PROMPT = {prompt!r}
_ENTRY = {entry!r}

def _domino_run():
    namespace = {{"__name__": "__domino_solution__"}}
    exec(compile(_SOLUTION, "<solution>", "exec"), namespace)
    if _ENTRY is not None:  # HumanEval style: tests define check(candidate)
        tests_ns = {{"__name__": "__domino_tests__"}}
        if _PROMPT:
            exec(compile(_PROMPT, "<prompt>", "exec"), tests_ns)
        helpers = set(tests_ns) - {{_ENTRY}}
        for k, v in namespace.items():  # the code's names, but the prompt's helpers stay the prompt's
            if not k.startswith("__") and not hasattr(_domino_builtins, k) and k not in helpers:
                tests_ns[k] = v
        exec(compile(_TESTS, "<tests>", "exec"), tests_ns)
        if _ENTRY not in namespace:
            raise NameError(f"name {{_ENTRY!r}} is not defined")
        tests_ns["check"](namespace[_ENTRY])
    else:  # bare asserts over the code's own names
        tests_ns = {{k: v for k, v in namespace.items() if not k.startswith("__") and not hasattr(_domino_builtins, k)}}
        tests_ns["__name__"] = "__domino_tests__"
        exec(compile(_TESTS, "<tests>", "exec"), tests_ns)
    import unittest
    cases = [v for v in list(tests_ns.values()) if isinstance(v, type) and issubclass(v, unittest.TestCase)
             and v is not unittest.TestCase]
    if cases:  # unittest.main() was removed with the __main__ block: run the cases here
        suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(c) for c in cases)
        result = unittest.TextTestRunner(verbosity=0).run(suite)
        if not result.wasSuccessful():
            raise AssertionError(f"unittest: {{len(result.failures)}} failures, {{len(result.errors)}} errors")

_domino_run()
_domino_emit("done")
'''


def _with_channel(body: str) -> str:
    return CHANNEL + body


def calls_program(solution: str, entry: str, calls: list) -> str:
    """The outputs of `solution`'s `entry` on each call's ([args], {kwargs}) as encoded data."""
    from domino_ray.sandbox.compare import NotData, from_data, to_data

    return _with_channel(_DATA_COMMON.format(to_data=inspect.getsource(to_data)) + _CALLS_HARNESS.format(
        from_data=inspect.getsource(NotData) + inspect.getsource(from_data), solution=solution, entry=entry,
        calls=_literal(calls)))


def expected_program(reference: Optional[str], entry: Optional[str], setup: list[str], tests: list[dict]) -> str:
    """The tests' expected values and tolerances, and the reference solution's outputs."""
    from domino_ray.sandbox.compare import to_data

    return _with_channel(_DATA_COMMON.format(to_data=inspect.getsource(to_data))
                         + _EXPECTED_HARNESS.format(reference=reference, entry=entry, setup="\n".join(setup), tests=tests))


def inputs_program(solution: str, entry: str, inputs: list, stop_at_exception: bool = True) -> str:
    """The outputs of `solution`'s `entry` on every input (EvalPlus)."""
    from domino_ray.sandbox.compare import to_data

    return _with_channel(_DATA_COMMON.format(to_data=inspect.getsource(to_data))
                         + _INPUTS_HARNESS.format(solution=solution, entry=entry, inputs=_literal(inputs),
                                                  stop=stop_at_exception))


def functional_program(p: Problem, solution: str) -> str:
    from domino_ray.sandbox.compare import to_data

    return _with_channel(_DATA_COMMON.format(to_data=inspect.getsource(to_data)) + _FUNCTIONAL_HARNESS.format(
        solution=solution, prelude=LCB_PRELUDE, func=p.entry_point, inputs=_literal([t["input"] for t in p.io_tests]),
        per_test=float(p.meta.get("per_test_timeout_s", 6.0))))


STDIO_CAPTURE_CHARS = 4 * 1024 * 1024  # stdout kept per test; longer is judged as a wrong answer


def stdio_program(p: Problem, solution: str) -> str:
    return _with_channel(_STDIO_HARNESS.format(
        solution=solution, prelude=LCB_PRELUDE, inputs=_literal([t["input"] for t in p.io_tests]),
        per_test=float(p.meta.get("per_test_timeout_s", 6.0)), cap=STDIO_CAPTURE_CHARS))


def assert_program(solution: str, tests: str, entry: Optional[str] = None, prompt: Optional[str] = None) -> str:
    """Code under test (its `__main__` blocks removed) + assert tests + the completion marker.
    `entry`: HumanEval style, tests define `check(candidate)`, called with it; else bare asserts."""
    from domino_ray.evaluate.checks import strip_main

    return _with_channel(_ASSERT_HARNESS.format(solution=strip_main(solution), tests=strip_main(tests),
                                                prompt=prompt, entry=entry))


def build_program(p: Problem, solution: str) -> str:
    """The assert-path program of a HumanEval-style or bare-assert problem (exit 0 and the
    completion marker when every test passes). Verdicts come from `evaluate.verdict.judge_solution`,
    which takes the data path wherever it can; this is what it falls back to."""
    if p.test_type == "check":
        return assert_program(solution, p.tests, entry=p.entry_point, prompt=p.prompt if p.prompt_kind == "code" else None)
    if p.test_type == "asserts":
        return assert_program(solution, p.tests)
    raise ValueError(f"problem {p.task_id}: {p.test_type} problems are judged on data (evaluate.verdict.judge_solution)")
