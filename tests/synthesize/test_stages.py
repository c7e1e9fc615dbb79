"""The stage classes as plain callables on the tiny model (no cluster): columns, gating, verdicts."""

import time

import numpy as np
import pytest

from domino_ray.config import config_from_dict
from domino_ray.schema import SYNTH_WORK_SCHEMA
from domino_ray.storage import Storage
from domino_ray.synthesize import blocks
from domino_ray.synthesize.records import batch_to_rows, read_table
from domino_ray.synthesize.run import SynthPaths
from domino_ray.synthesize.stages import (BlockWriter, DraftStage, JudgeStage, RespondStage, RowFilterStage,
                                          expand_blocks)
from domino_ray.synthesize.verdicts import RejectRules, first_failure
from tests.synthesize.conftest import make_representation, synth_config


@pytest.fixture(scope="module")
def setup(tiny_model_dir, references_file, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("run"))
    make_representation(tiny_model_dir, root)
    cfg = config_from_dict(synth_config(tiny_model_dir, root, references_file, n=6, block=4))
    return cfg, root


def common(cfg):
    return {"backbone_cfg": cfg.section_dict("backbone"), "run": cfg.run.name,
            "rules": vars(RejectRules.from_config(cfg.synthesize)), "storage_cfg": cfg.storage.s3.model_dump()}


def stage_kwargs(cfg, stage):
    return {"engine_cfg": stage.engine.model_dump(), "sampling": stage.sampling.model_dump()}


def test_stages_end_to_end_in_process(setup):
    cfg, root = setup
    syn = cfg.synthesize
    batch = expand_blocks({"id": np.array([0, 1])}, num_samples=6, block_size=4, run_seed=0)
    assert batch["seed_index"].tolist() == list(range(6)) and batch["block"].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch["draft_seed"].tolist() == [blocks.request_seed(0, s) for s in range(6)]

    draft = DraftStage(**common(cfg), **stage_kwargs(cfg, syn.draft), representation_uri=root, prefix="")
    called = time.time()
    out = draft(dict(batch))
    returned = time.time()
    rows = batch_to_rows(out)
    assert all(isinstance(r["draft"], str) for r in rows)
    assert all(called <= r["draft_started_at"] <= returned for r in rows)  # the engine's start on this batch
    assert all(r["prompt_tokens"] >= 4 for r in rows)  # the P soft tokens count as prompt
    assert all(0 < r["draft_tokens"] <= 24 for r in rows)
    again = batch_to_rows(draft(dict(batch)))  # same seeds, same drafts (HF engine honours seeds)
    assert [r["draft"] for r in again] == [r["draft"] for r in rows]

    # gating: a row with an empty draft is not sent to the respond engine
    out["draft"][1] = "   "
    respond = RespondStage(**common(cfg), **stage_kwargs(cfg, syn.respond), template=syn.respond.prompt_template)
    out = respond(out)
    rows = batch_to_rows(out)
    assert rows[1]["response"] is None and rows[1]["response_tokens"] is None
    assert all(isinstance(r["response"], str) for i, r in enumerate(rows) if i != 1)

    judge = JudgeStage(**common(cfg), **stage_kwargs(cfg, syn.judge), rubric=syn.judge.rubric, scale_max=10.0)
    out = judge(out)
    rows = batch_to_rows(out)
    assert rows[1]["judge_raw"] is None
    for i, r in enumerate(rows):
        if i != 1:
            assert isinstance(r["judge_raw"], str)
            assert (r["judge_score"] is None) == (r["judge_error"] is not None)

    filt = RowFilterStage(filter_cfg=syn.filter.model_dump(), run="t", respond_enabled=True,
                          references=cfg.section_dict("references"), s3_cfg=None)
    out = filt(out)
    rows = batch_to_rows(out)
    assert rows[1]["syntax_ok"] is None and rows[1]["dedup_key"] is None  # nothing to check
    assert all(isinstance(r["contaminated"], bool) and isinstance(r["novel"], bool) for i, r in enumerate(rows) if i != 1)
    assert all(isinstance(r["minhash"], bytes) for i, r in enumerate(rows) if i != 1)

    paths = SynthPaths(root)
    writer = BlockWriter(work_uri=paths.work, num_samples=6, block_size=4, s3_cfg=None,
                         constants={"run": "t", "backbone": "tiny", "representation_sha256": "abc",
                                    "temperature": 0.9, "top_p": 1.0}, rules=common(cfg)["rules"])
    # when the draft engine began each row's batch: block 0 began at its earliest row (3.0); block 1's
    # rows arrive in two calls, and its earliest row (2.0) is in the second
    out["draft_started_at"] = np.array([5.0, 3.0, 4.0, 6.0, 9.0, 2.0])
    first = {k: v[:5] for k, v in out.items()}
    rest = {k: v[5:] for k, v in out.items()}
    done = writer(first)
    assert done["block"].tolist() == [0]  # block 1 still misses seed 5
    assert done["started_at"].tolist() == [3.0]
    later = writer(rest)
    assert later["block"].tolist() == [1] and later["started_at"].tolist() == [2.0]
    table = read_table(Storage(), f"{paths.work}/{blocks.block_name(0)}")
    assert table.schema.equals(SYNTH_WORK_SCHEMA)
    written = table.to_pylist()
    assert [r["seed_index"] for r in written] == [0, 1, 2, 3]
    assert written[1]["reject_reason"] == "empty_draft" and not written[1]["accepted"]
    assert all(r["run"] == "t" and r["created_at"] is not None for r in written)


def test_missing_input_column_names_the_stage(setup):
    cfg, _ = setup
    respond = RespondStage(**common(cfg), **stage_kwargs(cfg, cfg.synthesize.respond), template="{draft}")
    with pytest.raises(KeyError, match=r"RespondStage: required input columns \[.response_seed.\]"):
        respond({"draft": np.array(["x"], dtype=object), "draft_finish_reason": np.array(["stop"], dtype=object)})


def test_execute_stage_runs_response_with_its_tests():
    from domino_ray.config import SandboxConfig
    from domino_ray.synthesize.stages import ExecuteStage

    rules = vars(RejectRules(reject_truncated=False, respond=True, judge=False))
    # a 2 s wall limit: the infinite-loop row times out fast
    stage = ExecuteStage(sandbox_cfg=SandboxConfig(timeout_s=2).model_dump(), run="t", rules=rules)
    ok = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(2, 3) == 5"
    batch = {
        "draft": np.array(["Add two numbers."] * 4 + [""], dtype=object),
        "draft_finish_reason": np.array(["stop"] * 5, dtype=object),
        "response": np.array([ok, wrong, ok, "```python\nwhile True: pass\n```", ok], dtype=object),
        "tests": np.array([tests, tests, "", "assert True", tests], dtype=object),
    }
    rows = batch_to_rows(stage(batch))
    assert [r["exec_status"] for r in rows] == ["passed", "failed", "skipped", "timeout", None]
    assert "AssertionError" in rows[1]["exec_detail"]
    assert rows[2]["exec_detail"] == "no tests"


def test_execute_stage_runs_the_solution_after_the_statements_imports():
    """A response written against `from typing import List` in the statement (and without the import
    itself, as HumanEval completions are) runs; it failed with NameError before."""
    from domino_ray.config import SandboxConfig
    from domino_ray.synthesize.stages import ExecuteStage

    rules = vars(RejectRules(reject_truncated=False, respond=True, judge=False))
    stage = ExecuteStage(sandbox_cfg=SandboxConfig(timeout_s=5).model_dump(), run="t", rules=rules)
    statement = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """ Sum of xs. """\n'
    code = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    batch = {"draft": np.array([statement, "Sum a list."], dtype=object),
             "draft_finish_reason": np.array(["cut", "stop"], dtype=object),
             "response": np.array([code, code], dtype=object),
             "tests": np.array(["assert total([1, 2]) == 3"] * 2, dtype=object)}
    rows = batch_to_rows(stage(batch))
    assert rows[0]["exec_status"] == "passed", rows[0]["exec_detail"]
    assert rows[1]["exec_status"] != "passed" and "NameError" in rows[1]["exec_detail"]


def test_baseline_drafts_without_soft_prompt(tiny_model_dir, references_file, tmp_path):
    cfg = config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file, n=4, block=4,
                                        draft={"enabled": False, "sampling": {"max_tokens": 8, "temperature": 0.9}}))
    draft = DraftStage(**common(cfg), **stage_kwargs(cfg, cfg.synthesize.draft), soft_prompt=False,
                       baseline_prompt="def ")
    rows = batch_to_rows(draft(expand_blocks({"id": np.array([0])}, num_samples=4, block_size=4, run_seed=0)))
    assert all(isinstance(r["draft"], str) and r["draft_tokens"] > 0 for r in rows)
    assert all(r["prompt_tokens"] < 4 for r in rows)  # "def " alone: no soft tokens


# ------------------------------------------------------------------------------------ dashboard metrics
def _scrape(run: str) -> dict[tuple[str, str, str], float]:
    """Summed counters of one run from the node's Prometheus endpoint (what the Ray dashboard plots)."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray.nodes()[0]
    text = urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                  timeout=10).read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("ray_domino_synth_samples_total", "ray_domino_synth_tokens_total") and s.labels.get("run") == run:
                key = (s.name, s.labels["stage"], s.labels.get("verdict") or s.labels.get("direction"))
                out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.slow
def test_stage_metrics_reach_the_ray_metrics_endpoint(ray_cluster, setup):
    """Samples by stage and verdict and tokens by stage, recorded by real stages in a Ray worker through
    ray.util.metrics, read back from the node's metrics export (Prometheus text)."""
    import time
    import uuid

    import ray

    cfg, root = setup
    run = f"metrics-{uuid.uuid4().hex[:8]}"
    kwargs = dict(common(cfg), run=run)
    draft_kwargs = dict(kwargs, **stage_kwargs(cfg, cfg.synthesize.draft), representation_uri=root, prefix="")
    filter_cfg = dict(cfg.synthesize.filter.model_dump(), decontaminate=[], novelty=False)

    @ray.remote(num_cpus=0.5)
    def work():
        rows = batch_to_rows(DraftStage(**draft_kwargs)(expand_blocks({"id": np.array([0])}, num_samples=4,
                                                                      block_size=4, run_seed=0)))
        batch = {"draft": np.asarray(["x = 1", "def f(:", "y = 2", ""], dtype=object)}
        RowFilterStage(filter_cfg=filter_cfg, run=run, respond_enabled=False)(batch)
        return sum(r["prompt_tokens"] for r in rows), sum(r["draft_tokens"] for r in rows)

    tokens_in, tokens_out = ray.get(work.remote())
    expected = {
        ("ray_domino_synth_samples_total", "draft", "ok"): None,  # ok + truncated = 4, split unknown
        ("ray_domino_synth_samples_total", "filter", "syntax_ok"): 2.0,
        ("ray_domino_synth_samples_total", "filter", "syntax_error"): 2.0,  # "def f(:" and the empty draft
        ("ray_domino_synth_tokens_total", "draft", "in"): float(tokens_in),
        ("ray_domino_synth_tokens_total", "draft", "out"): float(tokens_out),
    }
    deadline = time.time() + 120  # the metrics agent exports every few seconds
    while True:
        got = _scrape(run)
        drafts = got.get(("ray_domino_synth_samples_total", "draft", "ok"), 0) + \
            got.get(("ray_domino_synth_samples_total", "draft", "truncated"), 0)
        if drafts == 4 and all(got.get(k) == v for k, v in expected.items() if v is not None):
            break
        assert time.time() < deadline, f"metrics of run {run} after 120 s: {got}"
        time.sleep(1)
    assert tokens_in >= 4 * 4 and tokens_out > 0  # P = 4 soft tokens per request count as prompt


def test_draft_end_at_docstring_keeps_the_statement_and_passes_the_truncation_check(setup):
    """A draft that ran to max_tokens after a complete statement is cut there (finish reason `cut`) and
    is no longer `draft_truncated`; without end_at the same draft is rejected as truncated."""
    cfg, root = setup
    statement = 'def add(a: int, b: int) -> int:\n    """ Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n'
    answer = {"draft": statement + "    return a + b\n\ndef sub(", "draft_tokens": 24,
              "draft_finish_reason": "length", "draft_prompt_tokens": 4}
    rules = RejectRules(**{**vars(RejectRules.from_config(cfg.synthesize)), "reject_truncated": True})
    kwargs = {**common(cfg), **stage_kwargs(cfg, cfg.synthesize.draft), "representation_uri": root, "prefix": ""}
    cut, plain = {}, {}
    DraftStage(**kwargs, end_at="docstring").take(cut, answer)
    DraftStage(**kwargs).take(plain, answer)
    assert (cut["draft"], cut["draft_finish_reason"], cut["draft_tokens"]) == (statement, "cut", 24)
    assert first_failure(cut, rules, upto="draft") is None
    assert plain["draft"] == answer["draft"] and first_failure(plain, rules, upto="draft") == "draft_truncated"
    with pytest.raises(ValueError, match="end_at"):
        DraftStage(**kwargs, end_at="eos")
