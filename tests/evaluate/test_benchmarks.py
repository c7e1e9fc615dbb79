"""Benchmark loaders: HumanEval slices, LiveCodeBench (incl. compressed private tests), EvalPlus and
plain JSONL; malformed files name file and line; unknown names list the known ones."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import zlib

import pytest

from domino_ray.evaluate import KNOWN_BENCHMARKS, BenchmarkError, load_benchmark
from domino_ray.evaluate.benchmarks import decode_lcb_tests


def lcb_compress(tests: list[dict]) -> str:
    """LiveCodeBench's private-test encoding: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_humaneval_full_and_slices():
    assert len(load_benchmark("humaneval")) == 164
    tail = load_benchmark("humaneval:100:164")
    assert [p.task_id for p in tail[:2]] == ["HumanEval/100", "HumanEval/101"] and len(tail) == 64
    assert [p.task_id for p in load_benchmark("humaneval:160:")] == [f"HumanEval/{i}" for i in range(160, 164)]
    p = tail[0]
    assert p.test_type == "check" and p.prompt_kind == "code" and "def check(candidate)" in p.tests


@pytest.mark.parametrize("spec, match", [("humaneval:5", "expected humaneval"), ("humaneval:a:b", "integers"),
                                         ("humaneval:200:300", "selects no problems")])
def test_bad_humaneval_slices(spec, match):
    with pytest.raises(BenchmarkError, match=match):
        load_benchmark(spec)


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(BenchmarkError) as e:
        load_benchmark("mbpp:foo.jsonl")
    assert "unknown benchmark 'mbpp'" in str(e.value)
    assert all(name in str(e.value) for name in KNOWN_BENCHMARKS)


LCB_STDIO = {
    "question_title": "Sum", "question_content": "Read two integers and print their sum.", "platform": "atcoder",
    "question_id": "abc001_a", "contest_date": "2024-01-01", "starter_code": "", "difficulty": "easy",
    "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
    "private_test_cases": lcb_compress([{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}]),
    "metadata": "{}",
}
LCB_FUNCTIONAL = {
    "question_title": "Two sum", "question_content": "Return the sum of a list and a number.", "platform": "leetcode",
    "question_id": "3000", "starter_code": "class Solution:\n    def addAll(self, nums: List[int], k: int) -> int:\n        ",
    "public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}]),
    "private_test_cases": lcb_compress([{"input": "[]\n0", "output": "0", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "addAll"}),
}


def test_livecodebench_stdio_and_functional_with_compressed_private_tests(tmp_path):
    path = write_jsonl(tmp_path / "lcb.jsonl", [LCB_STDIO, LCB_FUNCTIONAL])
    stdio, functional = load_benchmark(f"livecodebench:{path}")
    assert stdio.task_id == "abc001_a" and stdio.test_type == "stdio" and stdio.prompt_kind == "text"
    assert stdio.io_tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"}]
    assert functional.test_type == "functional" and functional.entry_point == "addAll"
    assert functional.meta["starter_code"].startswith("class Solution")
    assert len(functional.io_tests) == 2
    assert [p.task_id for p in load_benchmark(f"livecodebench:{path}:1:2")] == ["3000"]


def test_livecodebench_pickle_with_globals_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(BenchmarkError, match="private_test_cases.*refusing to load"):
        decode_lcb_tests(payload, "lcb.jsonl:7", "private_test_cases")
    assert not marker.exists()


def test_evalplus_release_rows_and_check_rows(tmp_path):
    he = load_benchmark("humaneval:0:1")[0]
    diff_row = {"task_id": "HumanEval/0", "prompt": he.prompt, "entry_point": he.entry_point,
                "canonical_solution": he.canonical_solution, "base_input": [[[1.0, 2.0], 0.5]],
                "plus_input": [[[1.0, 1.2], 0.3]], "atol": 0}
    mbpp_row = {"task_id": "Mbpp/2", "prompt": '"""\nWrite a function to add.\nassert add(1, 2) == 3\n"""\n',
                "entry_point": "add", "canonical_solution": "def add(a, b):\n    return a + b\n",
                "base_input": [[1, 2]], "plus_input": [], "atol": 0}
    check_row = {"task_id": "HumanEval/0", "prompt": he.prompt, "entry_point": he.entry_point,
                 "canonical_solution": he.canonical_solution, "test": he.tests}
    path = tmp_path / "plus.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in [diff_row, mbpp_row, check_row]).encode()))
    diff, mbpp, check = load_benchmark(f"evalplus:{path}")
    assert diff.test_type == "diff" and diff.prompt_kind == "code" and diff.meta["plus_input"] == [[[1.0, 1.2], 0.3]]
    assert mbpp.test_type == "diff" and mbpp.prompt_kind == "text"
    assert check.test_type == "check"


def test_plain_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "tests": "assert double(2) == 4", "entry_point": "double"},
        {"task_id": "t2", "prompt": "Write `triple(x)`.", "entry_point": "triple",
         "tests": "def check(candidate):\n    assert candidate(2) == 6\n", "canonical_solution": "def triple(x):\n    return 3 * x\n"},
    ])
    first, second = load_benchmark(f"jsonl:{path}")
    assert first.task_id == "mine.jsonl:1" and first.test_type == "asserts" and first.prompt_kind == "code"
    assert second.task_id == "t2" and second.test_type == "check" and second.prompt_kind == "text"


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"prompt": "p", "tests": "t", "entry_point": "f"}\n{"prompt": "p", "tests": \n', r"bad\.jsonl:2: invalid JSON"),
        (b'{"prompt": "p", "entry_point": "f"}\n', r"bad\.jsonl:1: missing field 'tests'"),
        (b'\n\n{"prompt": 3, "tests": "t", "entry_point": "f"}\n', r"bad\.jsonl:3: field 'prompt' must be str"),
        (b'{"prompt": "p\xff", "tests": "t", "entry_point": "f"}\n', r"bad\.jsonl:1: not valid UTF-8"),
        (b'[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
        (b"", r"bad\.jsonl: no problems"),
    ],
)
def test_malformed_plain_jsonl_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(BenchmarkError, match=match):
        load_benchmark(f"jsonl:{path}")


def test_malformed_livecodebench_and_evalplus_name_file_and_line(tmp_path):
    lcb = write_jsonl(tmp_path / "lcb.jsonl", [LCB_STDIO, {**LCB_STDIO, "private_test_cases": "not json, not base64!"}])
    with pytest.raises(BenchmarkError, match=r"lcb\.jsonl:2: field 'private_test_cases' is neither JSON"):
        load_benchmark(f"livecodebench:{lcb}")
    plus = write_jsonl(tmp_path / "plus.jsonl", [{"task_id": "x", "prompt": "def f(a):\n", "entry_point": "f",
                                                  "canonical_solution": "    return a\n"}])
    with pytest.raises(BenchmarkError, match=r"plus\.jsonl:1: missing field 'base_input'"):
        load_benchmark(f"evalplus:{plus}")
    with pytest.raises(BenchmarkError, match="cannot read"):
        load_benchmark(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_benchmarks_read_from_s3(s3_server, s3_bucket):
    """README: every file benchmark takes an s3:// path (here on loopback S3), gzip too."""
    from domino_ray.storage import Storage

    storage = Storage(s3_server)
    he = load_benchmark("humaneval:0:1")[0]
    plus_row = {"task_id": "HumanEval/0", "prompt": he.prompt, "entry_point": he.entry_point,
                "canonical_solution": he.canonical_solution, "base_input": [[[1.0, 2.0], 0.5]], "plus_input": []}
    files = {
        "lcb.jsonl": "".join(json.dumps(r) + "\n" for r in [LCB_STDIO, LCB_FUNCTIONAL]).encode(),
        "plus.jsonl.gz": gzip.compress((json.dumps(plus_row) + "\n").encode()),
        "mine.jsonl": b'{"task_id": "d", "prompt": "Write d(x).", "tests": "assert d(1) == 2", "entry_point": "d"}\n',
    }
    for name, data in files.items():
        storage.write_bytes(f"s3://{s3_bucket}/bench/{name}", data)
    stdio, functional = load_benchmark(f"livecodebench:s3://{s3_bucket}/bench/lcb.jsonl", storage=storage)
    assert stdio.io_tests[1] == {"input": "5 7\n", "output": "12\n"} and functional.entry_point == "addAll"
    (plus,) = load_benchmark(f"evalplus:s3://{s3_bucket}/bench/plus.jsonl.gz:0:1", storage=storage)
    assert plus.test_type == "diff" and plus.meta["base_input"] == [[[1.0, 2.0], 0.5]]
    (mine,) = load_benchmark(f"jsonl:s3://{s3_bucket}/bench/mine.jsonl", storage=storage)
    assert mine.task_id == "d" and mine.test_type == "asserts"
    with pytest.raises(BenchmarkError, match=f"s3://{s3_bucket}/bench/none.jsonl: cannot read"):
        load_benchmark(f"jsonl:s3://{s3_bucket}/bench/none.jsonl", storage=storage)
