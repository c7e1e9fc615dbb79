"""The evaluation plan on a real local Ray cluster: HumanEval's canonical solutions through the
sandbox actor pool, and run_evaluate end to end with the tiny model (HF engine) on loopback S3 and
locally (where its Ray metrics are read back from the node's metrics export)."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from domino_ray.config import SandboxConfig, config_from_dict
from domino_ray.evaluate import execute_solutions, load_benchmark, pass_at_k, reference_solution, run_evaluate
from domino_ray.manifest import RunManifest
from domino_ray.schema import EVAL_RESULT_SCHEMA
from domino_ray.storage import Storage, join_uri

pytestmark = pytest.mark.slow

BROKEN = 20  # problems that also get a deliberately broken solution


@pytest.mark.timeout(600)
def test_canonical_humaneval_passes_164_of_164_through_the_pool(ray_cluster):
    problems = load_benchmark("humaneval")
    solutions = {p.task_id: [reference_solution(p)] for p in problems}
    for p in problems[:BROKEN]:
        solutions[p.task_id].append(p.prompt + "    return None\n")  # right signature, wrong answers
    sandbox = SandboxConfig(pool={"min_actors": 2, "max_actors": 2, "num_cpus": 0.25, "batch_size": 8})
    rows = execute_solutions(problems, solutions, sandbox)
    assert len(rows) == len(problems) + BROKEN
    canonical = [r for r in rows if r["sample_index"] == 0]
    failed = [(r["task_id"], r["exec_status"], r["exec_detail"]) for r in canonical if r["exec_status"] != "passed"]
    assert failed == [] and len(canonical) == 164
    broken = [r for r in rows if r["sample_index"] == 1]
    assert len(broken) == BROKEN and all(r["exec_status"] in ("failed", "error") for r in broken)


def tiny_eval_config(model_dir, output: str, s3=None, **evaluate) -> dict:
    cfg = {
        "run": {"name": "evaltest", "output": output, "seed": 0},
        "backbone": {"model": str(model_dir), "device": "cpu"},
        "evaluate": {
            "benchmark": "humaneval:0:4", "num_samples": 2, "k": [1, 2],
            "engine": {"kind": "hf", "max_model_len": 1024},
            "pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 8},
            "sampling": {"temperature": 0.8, "max_tokens": 24},
            **evaluate,
        },
        "sandbox": {"pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 8}},
    }
    if s3:
        cfg["storage"] = {"s3": s3}
    return cfg


@pytest.mark.timeout(600)
def test_run_evaluate_end_to_end_on_s3(ray_cluster, tiny_model_dir, s3_server, s3_bucket):
    s3 = s3_server.model_dump()
    cfg = config_from_dict(tiny_eval_config(tiny_model_dir, f"s3://{s3_bucket}/runs/evaltest", s3=s3))
    summary = run_evaluate(cfg, name="tiny")
    storage = Storage(s3_server)
    out = f"s3://{s3_bucket}/runs/evaltest/eval/tiny"
    table = pq.read_table(io.BytesIO(storage.read_bytes(join_uri(out, "results.parquet"))))
    assert table.schema.equals(EVAL_RESULT_SCHEMA, check_metadata=False)
    assert table.num_rows == 8
    rows = table.to_pylist()
    assert [(r["task_id"], r["sample_index"]) for r in rows] == [(f"HumanEval/{i}", j) for i in range(4) for j in range(2)]
    for r in rows:
        assert r["status"] in ("passed", "failed", "error", "timeout", "limit")
        assert r["passed"] == (r["status"] == "passed")
        assert r["program"].startswith(load_benchmark(f"humaneval:{r['task_id'].split('/')[1]}:")[0].prompt)
        assert r["completion_tokens"] is not None and r["completion_tokens"] <= 24
    # the summary is the unbiased estimator applied to the written rows
    per_task = {}
    for r in rows:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    for k in (1, 2):
        expected = sum(pass_at_k(2, sum(v), k) for v in per_task.values()) / 4
        assert summary["pass_at_k"][f"pass@{k}"] == pytest.approx(expected)
    assert storage.read_json(join_uri(out, "summary.json"))["pass_at_k"] == summary["pass_at_k"]
    assert summary["n"] == 2 and summary["k"] == [1, 2] and summary["temperature"] == 0.8
    assert summary["num_problems"] == 4 and summary["benchmark"] == "humaneval:0:4"
    stage = RunManifest(storage, f"s3://{s3_bucket}/runs/evaltest").stage("evaluate:tiny")
    assert stage["status"] == "completed" and stage["pass_at_k"] == summary["pass_at_k"]


@pytest.mark.timeout(600)
def test_run_evaluate_chat_style_locally(ray_cluster, tiny_model_dir, tmp_path):
    cfg = config_from_dict(tiny_eval_config(tiny_model_dir, str(tmp_path / "run"), benchmark="humaneval:10:12",
                                            num_samples=1, k=[1], prompt_style="chat",
                                            sampling={"temperature": 0.0, "max_tokens": 16}))
    summary = run_evaluate(cfg)
    name = summary["name"]
    assert name == tiny_model_dir.name
    table = pq.read_table(tmp_path / "run" / "eval" / name / "results.parquet")
    assert table.num_rows == 2 and set(table.column("task_id").to_pylist()) == {"HumanEval/10", "HumanEval/11"}
    assert (tmp_path / "run" / "eval" / name / "summary.json").exists()
    assert summary["prompt_style"] == "chat" and set(summary["pass_at_k"]) == {"pass@1"}
    # the driver recorded the run's Ray metrics while the verdict rows came back (evaluate/metrics.py)
    from tests.evaluate.test_metrics import wait_for

    statuses = table.column("status").to_pylist()
    wait_for(str(tmp_path / "run"), {
        **{("ray_domino_eval_completions_total", s): float(statuses.count(s)) for s in set(statuses)},
        ("ray_domino_eval_problems_done_total", ""): 2.0, ("ray_domino_eval_problems", ""): 2.0,
        ("ray_domino_eval_pass_at_k", "1"): summary["pass_at_k"]["pass@1"],
    })
