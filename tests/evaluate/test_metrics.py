"""evaluate/metrics.py: which problems a batch of verdicts completes (pure), and the counters and gauges
recorded on a real local Ray, read back from the node's metrics export (Prometheus text) as the
dashboard's Prometheus scrapes them."""

from __future__ import annotations

import time
import urllib.request
import uuid

from domino_ray.evaluate.metrics import EvalMetrics

NAMES = ("ray_domino_eval_completions_total", "ray_domino_eval_problems_done_total", "ray_domino_eval_problems",
         "ray_domino_eval_pass_at_k")


def _families():
    """The metric families of the Ray node's metrics export port (what Prometheus scrapes)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray.nodes()[0]
    text = urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                  timeout=10).read().decode()
    return text_string_to_metric_families(text)


def metric_samples(names) -> dict[str, float]:
    """{sample name: sum over its label sets} for the given sample names."""
    out: dict[str, float] = {}
    for family in _families():
        for s in family.samples:
            if s.name in names:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def scrape(run: str) -> dict[tuple, float]:
    """{(metric, status or k or ""): value} of one run, from the Ray node's metrics export port."""
    out: dict[tuple, float] = {}
    for family in _families():
        for s in family.samples:
            if s.name in NAMES and s.labels.get("run") == run:
                key = (s.name, s.labels.get("status") or s.labels.get("k") or "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def wait_for(run: str, expected: dict[tuple, float], deadline_s: float = 120) -> dict[tuple, float]:
    deadline = time.time() + deadline_s  # the metrics agent exports every few seconds
    while True:
        got = scrape(run)
        if all(got.get(k) == v for k, v in expected.items()):
            return got
        assert time.time() < deadline, f"metrics of run {run} after {deadline_s} s: {got}, expected {expected}"
        time.sleep(1)


def test_a_problem_is_done_when_its_last_sample_is_judged():
    m = EvalMetrics("r", "e", {"a": 2, "b": 1, "c": 3})
    assert m.judged(["a", "b"], ["passed", "failed"]) == 1  # b is done, a has one of two
    assert m.judged(["a", "c"], ["error", "passed"]) == 1  # a is done now
    assert m.judged(["c", "c"], ["timeout", "passed"]) == 1
    assert m.judged(["c"], ["passed"]) == 0  # more samples than expected complete nothing twice


def test_eval_metrics_reach_the_ray_metrics_endpoint(ray_cluster):
    run = f"eval-metrics-{uuid.uuid4().hex[:8]}"
    m = EvalMetrics(run, "tiny", {"HumanEval/0": 2, "HumanEval/1": 2, "HumanEval/2": 2})
    m.judged(["HumanEval/0", "HumanEval/0", "HumanEval/1"], ["passed", "failed", "passed"])
    m.judged(["HumanEval/1", "HumanEval/2"], ["timeout", "passed"])
    m.finished({"pass@1": 0.5, "pass@2": 1.0})
    wait_for(run, {
        ("ray_domino_eval_completions_total", "passed"): 3.0,
        ("ray_domino_eval_completions_total", "failed"): 1.0,
        ("ray_domino_eval_completions_total", "timeout"): 1.0,
        ("ray_domino_eval_problems_done_total", ""): 2.0,  # HumanEval/2 has one of its two samples
        ("ray_domino_eval_problems", ""): 3.0,
        ("ray_domino_eval_pass_at_k", "1"): 0.5,
        ("ray_domino_eval_pass_at_k", "2"): 1.0,
    })

