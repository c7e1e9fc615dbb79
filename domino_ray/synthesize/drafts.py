"""Code-problem drafts as text: where a statement ends, what its solution runs with, which lines of
self-written tests are tests (pure Python, no Ray).

A code-domain draft is a problem statement: a function's signature and its docstring, as in HumanEval
(DESIGN.md section 1). A small model conditioned on D often writes the statement and then goes on
with a body, a second function or prose until max_tokens. The statement it wrote is complete; what
follows is not part of the sample. `synthesize.draft.end_at: docstring` cuts each draft at the end of
its first function's docstring: its finish reason becomes `cut` (finished, not `draft_truncated`;
the records keep the count) and the respond stage gets the statement alone. A draft without a closed
docstring is left as it is.
"""

from __future__ import annotations

import ast
import re
from typing import Optional

__all__ = ["END_AT", "docstring_end", "cut_draft", "statement_imports", "assert_tests"]

END_AT = ("none", "docstring")  # synthesize.draft.end_at

# a `def` (or `async def`) header line; the signature may continue over several lines up to `):` or `) -> T:`
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(", re.MULTILINE)
_QUOTES = ('"""', "'''")


def _header_end(text: str, start: int) -> Optional[int]:
    """Index just past the newline that ends the def header starting at `start` (brackets balanced,
    then a colon ending the line), None if the header never closes."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ":" and depth == 0:
            nl = text.find("\n", i)
            rest = text[i + 1:nl if nl >= 0 else len(text)].split("#", 1)[0]
            if rest.strip():
                return None  # a one-line body after the colon: no docstring to end at
            return nl + 1 if nl >= 0 else None
        elif c == "\n" and depth == 0:
            return None
        i += 1
    return None


def docstring_end(text: str) -> Optional[int]:
    """Index just past the line that closes the docstring of the first function in `text` whose body
    starts with one, or None (no def, no docstring, or one that never closes)."""
    for m in _DEF.finditer(text):
        body = _header_end(text, m.end() - 1)
        if body is None:
            continue
        first = body
        while first < len(text) and text[first] in " \t":
            first += 1
        for q in _QUOTES:
            for prefix in ("", "r", "R"):
                opener = prefix + q
                if text.startswith(opener, first):
                    close = text.find(q, first + len(opener))
                    if close < 0:
                        return None
                    nl = text.find("\n", close + len(q))
                    return len(text) if nl < 0 else nl + 1
        # this def has no docstring: try the next one
    return None


def cut_draft(text: str, finish_reason: Optional[str]) -> tuple[str, Optional[str], bool]:
    """(draft, finish_reason, cut): the draft up to its first function's docstring. A cut draft's
    finish reason is `cut` whatever the engine said (the statement it holds is complete); a statement
    that already ends at its docstring counts as finished (`stop`)."""
    end = docstring_end(text or "")
    if end is None:
        return text, finish_reason, False
    cut = end < len(text)
    return text[:end], "cut" if cut else "stop", cut


def statement_imports(draft: Optional[str]) -> str:
    """The import lines a problem statement opens with (before its first def), e.g. `from typing import
    List`. A solution is written against the statement, as a HumanEval completion runs after its prompt,
    so the execute stage runs these lines before the response's code."""
    text = draft or ""
    first_def = _DEF.search(text)
    head = text[:first_def.start()] if first_def else text
    lines = [ln for ln in head.splitlines() if re.match(r"(?:import|from)\s+[\w.]+", ln)]
    keep = []
    for ln in lines:  # only lines Python accepts alone: a truncated or prose line is not an import
        try:
            compile(ln, "<statement>", "exec")
        except (SyntaxError, ValueError):
            continue
        keep.append(ln)
    return "\n".join(keep)


def _longest_parsable_prefix(code: str):
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):  # an answer cut at max_tokens: drop its unfinished tail
        try:
            return ast.parse("\n".join(lines[:end])), "\n".join(lines[:end])
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    return None, ""


def assert_tests(code: Optional[str]) -> str:
    """The top-level `assert` statements (and imports) of a self-written test answer, in order. A small
    model asked for asserts often redefines the function first; tests that bring their own copy of
    the solution would only test themselves, so definitions and other statements are dropped. An
    answer cut off mid-statement keeps what parses before the cut."""
    tree, source = _longest_parsable_prefix(code or "")
    if tree is None:
        return ""
    kept = [ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.Assert, ast.Import, ast.ImportFrom))]
    return "\n".join(k for k in kept if k)
