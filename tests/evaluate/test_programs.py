"""Prompts, code extraction and the verdicts of every benchmark kind, run in the real sandbox
(no Ray): right solutions pass, wrong ones fail with the right status."""

from __future__ import annotations

import json

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.evaluate import (
    Problem,
    chat_prompt,
    completion_prompt,
    extract_code,
    judge_solution,
    load_benchmark,
    reference_solution,
    solution_from_completion,
    stop_strings,
)
from domino_ray.evaluate.programs import truncate_at_stops

CFG = SandboxConfig(timeout_s=10, cpu_s=10, memory_mb=512)


def run(problem: Problem, solution: str):
    return judge_solution(problem, solution, CFG)


# --------------------------------------------------------------------------------- prompts, stops
def test_completion_and_chat_prompts():
    he = load_benchmark("humaneval:0:1")[0]
    assert completion_prompt(he) == he.prompt
    assert stop_strings(he, "completion") == ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
    assert "```python\n" + he.prompt.rstrip() in chat_prompt(he) and stop_strings(he, "chat") == []
    stmt = Problem("s", "Read n and print n squared.", test_type="stdio", prompt_kind="text")
    assert completion_prompt(stmt).endswith("stdout.\n\n```python\n") and stop_strings(stmt, "completion") == ["```"]
    leet = Problem("l", "Add.", entry_point="add", test_type="functional", prompt_kind="text",
                   meta={"starter_code": "class Solution:\n    def add(self, a, b):\n        "})
    assert completion_prompt(leet).endswith("```python\nclass Solution:\n    def add(self, a, b):\n        ")


def test_truncate_at_the_earliest_stop():
    text = "    return x\n\nprint(f(1))\ndef g():\n    pass"
    assert truncate_at_stops(text, ["\ndef ", "\nprint("]) == "    return x\n"
    assert truncate_at_stops("    return 1", ["\ndef "]) == "    return 1"


# ------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize(
    "response, expected",
    [
        ("Sure!\n```python\ndef f(x):\n    return x\n```\nDone.", "def f(x):\n    return x\n"),
        ("```py\nimport os\n```\n```python\ndef f(x):\n    return 2\n```", "def f(x):\n    return 2\n"),  # defines f
        ("```\nprint(1)\n```\n```python\nx = 1\ny = 2\n```", "x = 1\ny = 2\n"),  # longest without f
        ("Here you go:\n```python\ndef f(x):\n    return", "def f(x):\n    return"),  # cut by max_tokens
        ("The answer is below.\ndef f(x):\n    return 3\n", "def f(x):\n    return 3\n"),  # bare, prose before
        ("```bash\nls\n```\nreturn x", "return x"),  # only a non-Python fence
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response, "f") == expected


def test_solution_assembly_by_style():
    he = load_benchmark("humaneval:2:3")[0]  # truncate_number
    body = "    return number % 1.0\n"
    assert solution_from_completion(he, body + "\n\ndef extra():\n    pass", "completion") == he.prompt + body + "\n"
    chat = f"```python\ndef truncate_number(number: float) -> float:\n{body}```"
    solution = solution_from_completion(he, chat, "chat")
    assert solution.startswith(he.prompt) and solution.endswith(body)
    assert run(he, solution).status == "passed"
    assert run(he, solution_from_completion(he, f"```python\n{body}```", "chat")).status == "passed"  # body only


# ---------------------------------------------------------------------------- programs by kind
def test_humaneval_check_program_pass_and_fail():
    he = load_benchmark("humaneval:0:1")[0]
    assert run(he, reference_solution(he)).status == "passed"
    broken = run(he, he.prompt + "    return not " + he.canonical_solution.strip().splitlines()[-1].split("return ")[-1] + "\n")
    assert broken.status in ("failed", "error") and broken.status != "passed"
    assert run(he, he.prompt + "    return True\n").status == "failed"


def test_plain_jsonl_asserts_and_check(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "tests": "assert double(2) == 4\nassert double(-1) == -2",
         "entry_point": "double", "canonical_solution": "    return 2 * x\n"},
        {"prompt": "Write triple(x).", "entry_point": "triple", "tests": "def check(candidate):\n    assert candidate(2) == 6\n",
         "canonical_solution": "def triple(x):\n    return 3 * x\n"},
    ]))
    double, triple = load_benchmark(f"jsonl:{path}")
    assert run(double, reference_solution(double)).status == "passed"
    assert run(double, double.prompt + "    return x + 2\n").status == "failed"
    assert run(triple, reference_solution(triple)).status == "passed"
    assert run(triple, solution_from_completion(triple, "```python\ndef triple(x):\n    return x\n```", "chat")).status == "failed"


def test_evalplus_diff_program():
    he = load_benchmark("humaneval:0:1")[0]  # has_close_elements(numbers, threshold)
    plus = Problem(he.task_id, he.prompt, he.entry_point, canonical_solution=he.canonical_solution, test_type="diff",
                   meta={"base_input": [[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0], 0.3]],
                         "plus_input": [[[], 1.0], [[1.0, 1.0], 0.0]], "atol": 0})
    assert run(plus, reference_solution(plus)).status == "passed"
    off_by_one = plus.prompt + "    return any(abs(a - b) <= threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    result = run(plus, off_by_one)  # differs only on the plus input [1.0, 1.0], 0.0
    assert result.status == "failed" and "input 3" in result.detail
    floats = Problem("f", "def half(x):\n", "half", canonical_solution="    return x / 2\n", test_type="diff",
                     meta={"base_input": [[1.0], [3.0]], "plus_input": [], "atol": 0})
    assert run(floats, floats.prompt + "    return x * 0.5 + 1e-9\n").status == "passed"  # within 1e-6
    assert run(floats, floats.prompt + "    return x * 0.5 + 1e-3\n").status == "failed"


def test_livecodebench_stdio_program():
    p = Problem("abc", "Sum two integers.", test_type="stdio", prompt_kind="text",
                io_tests=[{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}],
                meta={"per_test_timeout_s": 2.0}, timeout_s=20)
    good = "a, b = map(int, open(0).read().split())\nprint(a + b)\n"  # reads fd 0 directly
    assert run(p, good).status == "passed"
    assert run(p, "print(3)\n").status == "failed"
    crash = run(p, "a, b = map(int, input().split())\nprint(a + b + undefined)\n")
    assert crash.status == "error" and "NameError" in crash.detail
    slow = run(p, "import time\ntime.sleep(10)\n")
    assert slow.status == "timeout" and "time limit of 2 s" in slow.detail
    # LiveCodeBench's prelude: names like deque work without an import
    assert run(p, "d = deque(map(int, input().split()))\nprint(sum(d))\n").status == "passed"


def test_livecodebench_functional_program():
    p = Problem("3000", "Add all.", entry_point="addAll", test_type="functional", prompt_kind="text",
                io_tests=[{"input": "[1, 2]\n3", "output": "6"}, {"input": "[]\n0", "output": "0"}],
                meta={"starter_code": "class Solution:\n    def addAll(self, nums: List[int], k: int) -> int:\n        ",
                      "per_test_timeout_s": 2.0}, timeout_s=20)
    good = "class Solution:\n    def addAll(self, nums: List[int], k: int) -> int:\n        return sum(nums) + k\n"
    assert run(p, good).status == "passed"
    completion = "return sum(nums) + k\n```"
    assert run(p, solution_from_completion(p, completion, "completion")).status == "passed"
    assert run(p, good.replace("+ k", "- k")).status == "failed"
    loop = run(p, good.replace("return sum(nums) + k", "while True:\n            pass"))
    assert loop.status == "timeout"


def test_data_path_inputs_are_computed_once(tmp_path):
    """A check whose input is random: the call's arguments come from the expected-values run, as
    data, so the candidate sees the very input its expected value was computed from."""
    path = tmp_path / "rand.jsonl"
    path.write_text(json.dumps({
        "task_id": "ident", "prompt": "def ident(x):\n", "entry_point": "ident",
        "tests": "import random\n\ndef check(candidate):\n    x = random.random()\n    assert candidate(x) == x\n"
                 "    assert abs(candidate(x) - x) < 1e-12\n",
        "canonical_solution": "    return x\n"}) + "\n")
    (p,) = load_benchmark(f"jsonl:{path}")
    right = run(p, reference_solution(p))
    assert right.status == "passed" and right.path == "data"
    assert run(p, p.prompt + "    return x + 1e-9\n").status == "failed"
