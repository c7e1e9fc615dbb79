"""Static analysis of test code and of code under test, with `ast` only (pure Python, no Ray):

    data_tests(tests, callee, entry_point)  a benchmark's assert tests as data: per assert, the call
                                            of the function under test and how its output is judged
                                            (None when some assert cannot be turned into data; such
                                            problems take the assert path)
    strip_main(code)                        `if __name__ == "__main__":` blocks, top-level
                                            `unittest.main()`, `sys.exit(...)`, `exit()`/`quit()`
                                            removed (a chat answer ending in one of them would end
                                            the program before the tests appended after it)
    refusal(code)                           the first call or name that can end or hijack the
                                            process running assert-style tests, or None

`refusal` is a static filter over the source, so it is a speed bump, not a wall: names built at run
time (`getattr(os, "_ex" + "it")`) get past it. What it cannot stop the completion marker does
(an early exit, however reached, prints no marker); see `domino_ray.evaluate.verdict` for the full
account of what remains.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["DataTest", "DataTests", "data_tests", "strip_main", "refusal", "REFUSED_MODULES", "REFUSED_NAMES",
           "REFUSED_ATTRIBUTES"]


# ------------------------------------------------------------------------------- tests as data
@dataclass
class DataTest:
    call: str  # source of the call of the function under test, as `candidate(...)`
    rule: str  # eq | is | abs_lt | abs_le | truthy | falsy (sandbox.compare.values_match)
    expected: Optional[str] = None  # source of the value the output is compared with
    eps: Optional[str] = None  # source of the tolerance of abs rules
    wrap: Optional[str] = None  # builtin applied to the output before comparing (tuple(candidate(x)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DataTests:
    tests: list[DataTest]
    # statements the calls and expected values need (module level and check's own), in order; they
    # run only in the expected-values program, which also turns each call's arguments into data
    setup: list[str]


_WRAPPERS = ("tuple", "list", "sorted", "set", "frozenset")


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_call_of(node: ast.AST, callee: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == callee


def _as_candidate_call(call: ast.Call) -> str:
    return ast.unparse(ast.Call(func=ast.Name("candidate", ast.Load()), args=call.args, keywords=call.keywords))


def _output_side(node: ast.AST, callee: str) -> Optional[tuple[ast.Call, Optional[str]]]:
    """(call, wrap) when `node` is `callee(...)` or `tuple(callee(...))` and friends."""
    if _is_call_of(node, callee):
        return node, None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _WRAPPERS
            and len(node.args) == 1 and not node.keywords and _is_call_of(node.args[0], callee)):
        return node.args[0], node.func.id
    return None


def _data_test(test: ast.AST, callee: str, forbidden: set[str]) -> Optional[DataTest]:
    def clean(*nodes: ast.AST) -> bool:  # no reference to the function under test elsewhere
        return not any(_names(n) & forbidden for n in nodes if n is not None)

    if _is_call_of(test, callee) and clean(*test.args, *test.keywords):
        return DataTest(_as_candidate_call(test), "truthy")
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and _is_call_of(test.operand, callee):
        call = test.operand
        return DataTest(_as_candidate_call(call), "falsy") if clean(*call.args, *call.keywords) else None
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    op, left, right = test.ops[0], test.left, test.comparators[0]
    if isinstance(op, (ast.Eq, ast.Is)):
        side = _output_side(left, callee)
        other = right
        if side is None:
            side, other = _output_side(right, callee), left
        if side is None:
            return None
        call, wrap = side
        if not clean(*call.args, *call.keywords, other):
            return None
        if isinstance(op, ast.Is) and not (isinstance(other, ast.Constant) and other.value in (None, True, False)):
            return None
        return DataTest(_as_candidate_call(call), "eq" if isinstance(op, ast.Eq) else "is", ast.unparse(other), wrap=wrap)
    if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) and isinstance(left.func, ast.Name) \
            and left.func.id == "abs" and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
            and isinstance(left.args[0].op, ast.Sub):
        a, b = left.args[0].left, left.args[0].right
        if not _is_call_of(a, callee):
            a, b = b, a  # abs(v - candidate(x)) is the same test
        if not _is_call_of(a, callee) or not clean(*a.args, *a.keywords, b, right):
            return None
        return DataTest(_as_candidate_call(a), "abs_lt" if isinstance(op, ast.Lt) else "abs_le",
                        ast.unparse(b), eps=ast.unparse(right))
    return None


def _defined(stmt: ast.stmt) -> set[str]:
    out: set[str] = set()
    for n in ast.walk(stmt):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.add((n.asname or n.name).split(".")[0])
    return out


def data_tests(tests: str, callee: str, entry_point: Optional[str]) -> Optional[DataTests]:
    """The asserts of `tests` as data tests, or None when any of them is not a plain comparison of
    one call of the function under test with a value (loops, random inputs, calls whose arguments
    or expected value involve the function under test...).

    `callee` is `candidate` for HumanEval-style `def check(candidate)` tests (which are then read
    from the body of `check`) or the entry point's name for bare asserts."""
    try:
        module = ast.parse(tests)
    except (SyntaxError, ValueError):
        return None
    forbidden = {callee} | ({entry_point} if entry_point else set())
    if callee == "candidate":
        checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
        if len(checks) != 1 or [a.arg for a in checks[0].args.args] != ["candidate"]:
            return None
        outer = [n for n in module.body if n is not checks[0]]
        body = checks[0].body
    else:
        outer, body = [], module.body
    setup_nodes: list[ast.stmt] = []
    for stmt in outer:  # module level beside check(): imports, METADATA, helpers
        if _names(stmt) & forbidden or isinstance(stmt, ast.Assert):
            return None
        setup_nodes.append(stmt)
    out: list[DataTest] = []
    for stmt in body:
        if isinstance(stmt, ast.Expr) and not (_names(stmt) & forbidden):
            continue  # docstrings, a stray print
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Assert):
            if isinstance(stmt.test, ast.Constant):
                if not stmt.test.value:
                    return None  # `assert False`: no data stands for it
                continue
            t = _data_test(stmt.test, callee, forbidden)
            if t is None:
                return None
            out.append(t)
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)) and not (_names(stmt) & forbidden):
            # setup between tests (HumanEval/151) runs before all of them: only when that changes
            # nothing, i.e. it rebinds no name and no earlier test uses a name it binds
            bound = _defined(stmt)
            earlier = set().union(set(), *(_names(ast.parse(t.call)) | _names(ast.parse(t.expected or "0"))
                                            | _names(ast.parse(t.eps or "0")) for t in out))
            if bound & (earlier | set().union(set(), *(_defined(s) for s in setup_nodes))):
                return None
            setup_nodes.append(stmt)
            continue
        return None  # loops, conditionals, anything else
    if not out:
        return None
    return DataTests(out, [ast.unparse(s) for s in setup_nodes])


# --------------------------------------------------------------------------------- __main__ blocks
def _is_main_guard(test: ast.AST) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


def _is_process_end_call(stmt: ast.stmt) -> bool:
    """`unittest.main(...)`, `sys.exit(...)`, `exit(...)`, `quit(...)`, `main()` wrapped in them."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
        return False
    f = stmt.value.func
    if isinstance(f, ast.Name):
        return f.id in ("exit", "quit")
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return (f.value.id, f.attr) in (("unittest", "main"), ("sys", "exit"), ("pytest", "main"))
    return False


def strip_main(code: str) -> str:
    """`code` without top-level `if __name__ == "__main__":` blocks (their `else:` branch is kept:
    it is what runs when the code is not the main module) and without top-level statements that
    end the process (`unittest.main()`, `sys.exit(main())`, `exit()`). Code that does not parse is
    returned as it is (it fails with its SyntaxError)."""
    try:
        module = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    lines = code.splitlines(keepends=True)
    cuts: list[tuple[int, int, list[ast.stmt]]] = []  # (first line, last line, statements kept)
    for stmt in module.body:
        if isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
            cuts.append((stmt.lineno, stmt.end_lineno, stmt.orelse))
        elif _is_process_end_call(stmt):
            cuts.append((stmt.lineno, stmt.end_lineno, []))
    if not cuts:
        return code
    for first, last, kept in reversed(cuts):
        replacement = "".join(ast.unparse(s) + "\n" for s in kept) or "pass\n"
        lines[first - 1:last] = [replacement]
    return "".join(lines)


# -------------------------------------------------------------------------------------- refusal
# Imports that end the process, hook its exit or reach the harness's frames and objects.
REFUSED_MODULES = {"atexit", "signal", "inspect", "gc", "ctypes", "builtins", "__main__", "importlib", "_thread",
                   "faulthandler", "sys_monitoring", "unittest.mock", "mock", "pdb", "bdb", "trace",
                   "_ctypes", "cffi", "code", "codeop", "runpy", "__builtin__"}
# Names that end the process, run code the filter cannot see, or reach namespaces and frames.
REFUSED_NAMES = {"exit", "quit", "SystemExit", "__import__", "eval", "exec", "compile", "globals", "breakpoint",
                 "__builtins__", "__loader__", "__spec__", "__file__"}
# Attributes (and getattr/setattr names) for the same, plus frame and trace access; also the
# comparison and truth dunders a forged return value needs (`__eq__` always true beats `==` and,
# with `__sub__`/`__abs__`/`__lt__`, `abs(a - b) < eps`).
REFUSED_ATTRIBUTES = {
    "_exit", "exit", "excepthook", "unraisablehook", "displayhook", "breakpointhook",
    "settrace", "setprofile", "gettrace", "monitoring", "addaudithook", "_getframe", "_current_frames",
    "_current_exceptions", "modules", "meta_path", "path_hooks", "f_back", "f_globals", "f_locals", "f_builtins",
    "f_code", "tb_frame", "tb_next", "gi_frame", "cr_frame", "ag_frame", "__traceback__", "__globals__",
    "__code__", "__closure__", "__subclasses__", "__builtins__", "__import__", "get_objects", "get_referrers",
    "get_referents", "walk_stack", "walk_tb", "argv", "orig_argv", "execv", "execve", "execl", "execvp",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__abs__", "__sub__", "__rsub__",
    "__float__", "__instancecheck__", "__subclasscheck__",
}
# String constants that name the harness's program file or the process's own memory and pipes.
_REFUSED_PATH_PARTS = ("/proc", "/dev/fd", "/sandbox/.run", ".run/", "main.py")


def _import_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        return [mod] + [f"{mod}.{a.name}" for a in node.names] + [a.name for a in node.names if mod == "sys"]
    return []


def refusal(code: str) -> Optional[str]:
    """The first construct in `code` that can end or hijack a process running assert-style tests
    (as a one-line reason naming it and its line), or None. Code that does not parse is not refused
    (it fails with its SyntaxError when run)."""
    try:
        module = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    modules_bound: set[str] = set()
    for node in ast.walk(module):
        line = getattr(node, "lineno", "?")
        for name in _import_names(node):
            top = name.split(".")[0]
            if name in REFUSED_MODULES or top in REFUSED_MODULES or name in ("sys.exit", "os._exit", "os.abort",
                                                                              "sys.excepthook", "sys.modules",
                                                                              "sys._getframe", "sys.settrace",
                                                                              "os.kill", "threading.settrace"):
                return f"line {line}: import of {name} (it can end or hijack the test process)"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules_bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, ast.Name) and node.id in REFUSED_NAMES:
            return f"line {line}: {node.id} (it can end the process or run code this check cannot see)"
        if isinstance(node, ast.Name) and node.id.startswith("__") and node.id in REFUSED_ATTRIBUTES:
            return f"line {line}: {node.id} (a class attribute that can forge a comparison or hijack the process)"
        if isinstance(node, ast.Attribute) and node.attr in REFUSED_ATTRIBUTES:
            return f"line {line}: .{node.attr} (it can end or hijack the test process or forge a comparison)"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in REFUSED_ATTRIBUTES:
            return f"line {line}: def {node.name} (a return value with its own {node.name} can forge a comparison)"
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, (ast.Name, ast.Attribute)) and \
                    (getattr(exc, "id", None) or getattr(exc, "attr", None)) in ("SystemExit", "KeyboardInterrupt",
                                                                                 "GeneratorExit"):
                return f"line {line}: raise {ast.unparse(exc)} (it ends the process before the tests finish)"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in REFUSED_ATTRIBUTES and node.value.startswith("_"):
                return f"line {line}: the string {node.value!r} (a name that can end or hijack the process)"
            hit = next((p for p in _REFUSED_PATH_PARTS if p in node.value), None)
            if hit:
                return f"line {line}: the path {node.value[:60]!r} (the test program's own file, memory or pipes)"
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in modules_bound:
                        return f"line {line}: assignment to {ast.unparse(sub)} (patching a module the tests use)"
    # names bound at top level that shadow builtins the tests use (`abs = ...`) are handled by the
    # harness: the tests run in their own namespace, which gets no such names
    return None
