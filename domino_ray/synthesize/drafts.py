"""Where a drafted code problem ends (pure Python, no Ray).

A code-domain draft is a problem statement: a function's signature and its docstring, as in HumanEval
(DESIGN.md section 1). A small model conditioned on D often writes the statement and then goes on
with a body, a second function or prose until max_tokens. The statement it wrote is complete; what
follows is not part of the sample. `synthesize.draft.end_at: docstring` cuts each draft at the end of
its first function's docstring: its finish reason becomes `cut` (finished, not `draft_truncated`;
the records keep the count) and the respond stage gets the statement alone. A draft without a closed
docstring is left as it is.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["END_AT", "docstring_end", "cut_draft"]

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
