"""The service's HTTP contract without a cluster: bodies, errors naming fields, seeds, records, domains."""

from __future__ import annotations

import datetime as dt
import json
import pickle

import pyarrow as pa
import pytest

from domino_ray import schema
from domino_ray.serve import api
from domino_ray.serve.domains import DomainError, check_domains_fit, load_domains, parse_run_spec
from domino_ray.synthesize.verdicts import RejectRules


def refused(raw, model=api.SamplesRequest) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        api.parse_body(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), model)
    return info.value


@pytest.mark.parametrize("raw, status, param", [
    (b"{not json", 400, "body"),
    (b"\xff\xfe", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"n": "5"}, 422, "n"),  # strict: a numeric string is not an int
    ({"n": 2.5}, 422, "n"),
    ({"n": True}, 422, "n"),  # nor is a bool
    ({"n": 0}, 422, "n"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"max_tokens": -1}, 422, "max_tokens"),
    ({"seed": -3}, 422, "seed"),
    ({"stages": ["judge"]}, 422, "stages.0"),
    ({"stages": "respond"}, 422, "stages"),
    ({"samples": 3}, 422, "samples"),  # unknown field
])
def test_bad_sample_bodies_name_the_field(raw, status, param):
    err = refused(raw)
    assert (err.status, err.param) == (status, param)
    assert param.split(".")[0] in err.message
    assert err.body()["error"]["param"] == param and err.body()["error"]["code"] == status


def test_good_bodies_parse_and_floats_take_ints():
    body = api.parse_body(b'{"n": 3, "temperature": 1, "stages": ["respond", "dedup"]}', api.SamplesRequest)
    assert (body.n, body.temperature, body.stages, body.seed, body.start) == (3, 1.0, ["respond", "dedup"], None, 0)
    assert api.parse_body(b"", api.SamplesRequest).n == 1
    c = api.parse_body(b'{"model": "alpha", "prompt": ["x"], "stop": "\\n", "user": "me"}', api.CompletionRequest)
    assert (c.model, c.prompt, c.stop) == ("alpha", ["x"], "\n")
    assert refused({"prompt": "x"}, api.CompletionRequest).param == "model"
    assert refused({"model": "a", "logprobs": 2}, api.CompletionRequest).param == "logprobs"


def test_errors_cross_process_boundaries_intact():
    err = pickle.loads(pickle.dumps(api.ApiError(404, "unknown domain", "model", "not_found_error")))
    assert (err.status, err.message, err.param, err.type) == (404, "unknown domain", "model", "not_found_error")


def test_n_cap_and_context_checks_name_their_field():
    api.check_n(256, 256)
    with pytest.raises(api.ApiError) as info:
        api.check_n(257, 256)
    assert info.value.param == "n" and "256" in info.value.message
    api.check_context(max_tokens=124, prompt_tokens=4, max_model_len=128)  # exactly fills the context
    with pytest.raises(api.ApiError) as info:
        api.check_context(max_tokens=125, prompt_tokens=4, max_model_len=128)
    assert info.value.param == "max_tokens" and "at most 124" in info.value.message


def test_sample_seeds_are_the_batch_plan_seeds():
    # expected values from the batch plan's own seed expansion (synthesize.stages.expand_blocks)
    import numpy as np

    from domino_ray.synthesize.stages import expand_blocks

    batch = expand_blocks({"id": np.arange(3)}, num_samples=10, block_size=4, run_seed=7)
    specs = api.sample_specs(7, 2, 6)
    assert [s.seed_index for s in specs] == list(range(2, 8))
    assert [s.draft_seed for s in specs] == batch["draft_seed"][2:8].tolist()
    assert [s.response_seed for s in specs] == batch["response_seed"][2:8].tolist()
    assert api.completion_specs(7, 3) == api.sample_specs(7, 0, 3)
    assert api.sample_specs(8, 2, 1)[0].draft_seed != specs[0].draft_seed


def _record(seed_index, text, finish="stop", seed=7, response=None, syntax=False, rules=None, dedup=None):
    spec = api.sample_specs(seed, seed_index, 1)[0]
    return api.build_record(run="alpha", seed=seed, run_seed=7, spec=spec,
                            draft={"text": text, "tokens": 5, "finish_reason": finish, "prompt_tokens": 4},
                            temperature=0.8, top_p=1.0, backbone="m", representation_sha256="sha", response=response,
                            syntax=syntax, rules=rules or RejectRules(respond=False, judge=False), dedup=dedup)


def test_records_fit_the_record_schema_and_carry_batch_ids():
    rows = [_record(0, "def f():\n    return 1\n"), _record(1, "x = (", "length")]
    for r in rows:
        r["created_at"] = dt.datetime.fromisoformat(r["created_at"])
    table = schema.validate_records(pa.Table.from_pylist(rows))
    assert table.num_rows == 2 and table.column_names == schema.RECORD_SCHEMA.names
    assert rows[0]["id"] == schema.sample_id("alpha", 0)  # the run's seed: the batch record's id
    assert _record(0, "a", seed=8)["id"] != rows[0]["id"]  # another seed names other samples
    assert (rows[0]["accepted"], rows[0]["reject_reason"]) == (True, None)
    assert (rows[1]["accepted"], rows[1]["reject_reason"]) == (False, "draft_truncated")
    assert rows[0]["draft_seed"] == api.sample_specs(7, 0, 1)[0].draft_seed


def test_syntax_respond_and_dedup_verdicts():
    rules = RejectRules(respond=False, judge=False)
    assert _record(0, "def f(:", syntax=True, rules=rules)["reject_reason"] == "syntax_error"
    assert _record(0, "```python\nx = 1\n```", syntax=True, rules=rules)["syntax_ok"] is True
    with_respond = RejectRules(respond=True, judge=False)
    r = _record(0, "Write f.", syntax=True, rules=with_respond, response={"text": "```python\ndef f(): pass\n```", "tokens": 9})
    assert (r["response"], r["response_tokens"], r["syntax_ok"], r["accepted"]) == \
        ("```python\ndef f(): pass\n```", 9, True, True)
    assert _record(0, "Write f.", rules=with_respond, response={"text": " ", "tokens": 1})["reject_reason"] == "empty_response"
    dedup = api.RequestDedup(0.85, 128, 5)
    text = "def add(a, b):\n    return a + b  # the sum of two numbers\n"
    first = _record(3, text, rules=rules, dedup=dedup)
    copy = _record(4, text.upper(), rules=rules, dedup=dedup)  # same words up to case
    broken = _record(5, text, "length", rules=rules, dedup=dedup)  # rejected before dedup: not compared
    other = _record(6, "class Stack:\n    def push(self, x):\n        self.items.append(x)\n", rules=rules, dedup=dedup)
    assert first["duplicate_of"] is None and first["accepted"]
    assert (copy["duplicate_of"], copy["reject_reason"]) == (3, "duplicate")
    assert (broken["duplicate_of"], broken["reject_reason"]) == (None, "draft_truncated")
    assert other["duplicate_of"] is None and other["accepted"]


def test_run_specs():
    assert parse_run_spec("alpha=/runs/a") == ("alpha", "/runs/a")
    assert parse_run_spec("s3://bucket/runs/a") == (None, "s3://bucket/runs/a")
    assert parse_run_spec("/runs/x=y") == (None, "/runs/x=y")
    assert parse_run_spec("code=s3://b/r") == ("code", "s3://b/r")


def test_domains_take_run_names_and_seeds_and_refuse_clashes(serve_domains, tmp_path):
    from tests.serve.conftest import ALPHA_SEED, ALPHA_TOKENS

    domains = load_domains([str(serve_domains["alpha"]), f"other={serve_domains['beta']}"])
    assert sorted(domains) == ["alpha", "other"]
    alpha = domains["alpha"]
    assert (alpha.run, alpha.run_seed, alpha.num_domain_tokens) == ("alpha", ALPHA_SEED, len(ALPHA_TOKENS))
    assert alpha.public()["references_sha256"] == "ref-sha-of-alpha" and alpha.public()["learned_at"]
    assert (domains["other"].run, domains["other"].run_seed) == ("other", 0)
    assert load_domains([str(serve_domains["beta"])])["beta"].run == "beta"  # the folder name
    with pytest.raises(DomainError, match="two domains are named 'alpha'"):
        load_domains([str(serve_domains["alpha"]), f"alpha={serve_domains['beta']}"])
    with pytest.raises(DomainError, match="missing"):
        load_domains([str(tmp_path / "missing")])
    with pytest.raises(DomainError, match="--run"):
        load_domains([])


def test_domains_take_the_draft_length_batch_synthesis_resolved(serve_domains, tmp_path):
    """A config with draft max_tokens null serves with the length the run's synthesis derived (so served
    samples equal batch samples); a run that never synthesized has none (the service's fallback)."""
    import shutil

    from domino_ray.storage import Storage

    run = tmp_path / "alpha"
    shutil.copytree(serve_domains["alpha"], run)
    Storage().write_json(str(run / "synth" / "manifest.json"), {"draft_max_tokens": 37})
    assert load_domains([str(run)])["alpha"].draft_max_tokens == 37
    assert load_domains([str(run)])["alpha"].draft_end_at == "none"
    assert load_domains([str(serve_domains["beta"])])["beta"].draft_max_tokens is None
    Storage().write_json(str(run / "synth" / "manifest.json"),
                         {"draft_max_tokens": 37, "config": {"synthesize": {"draft": {"end_at": "docstring"}}}})
    assert load_domains([str(run)])["alpha"].draft_end_at == "docstring"


def test_served_drafts_end_where_batch_drafts_end():
    """The batch DraftStage's end_at rule on a served answer: cut after the docstring, reason `cut`."""
    from domino_ray.serve.deployments import _end_draft

    statement = 'def f(x):\n    """Double x.\n    >>> f(2)\n    4\n    """\n'
    answer = {"text": statement + "    return 2 * x\n", "tokens": 30, "finish_reason": "length", "prompt_tokens": 4}
    assert _end_draft(answer, "docstring") == {**answer, "text": statement, "finish_reason": "cut"}
    assert _end_draft(answer, "none") == answer


def test_domains_learned_on_another_backbone_are_refused_by_name(serve_domains, tiny_model_dir, tmp_path):
    import torch

    from domino_ray.representation import save_representation

    save_representation(str(tmp_path / "wide"), torch.zeros(2, 64), {"backbone": "other-model", "backbone_signature": "abc"})
    check_domains_fit(load_domains([str(serve_domains["alpha"])]), str(tiny_model_dir))
    with pytest.raises(DomainError, match=r"wide \(learned on 'other-model', H=64") as info:
        check_domains_fit(load_domains([str(serve_domains["alpha"]), str(tmp_path / "wide")]), str(tiny_model_dir))
    assert "alpha" not in str(info.value).split("cannot serve:")[1]


def test_domains_learned_by_learn_fit_and_other_weights_are_refused(tiny_model_dir, tmp_path):
    """learn records `ARCH-WEIGHTS`: a D learned on this very model serves; a D of the same architecture
    learned on other weights (a base model's D on its instruct sibling) is refused by name."""
    import torch
    from transformers import AutoConfig

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import save_representation

    config = AutoConfig.from_pretrained(tiny_model_dir)
    own = backbone_signature(config, weights=str(tiny_model_dir))
    arch = own.partition("-")[0]
    assert own.partition("-")[2], "the tiny model has safetensors weights, so a weights part"
    hidden = int(config.hidden_size)
    save_representation(str(tmp_path / "same"), torch.zeros(2, hidden), {"backbone": str(tiny_model_dir), "backbone_signature": own})
    save_representation(str(tmp_path / "sibling"), torch.zeros(2, hidden), {"backbone": "x", "backbone_signature": f"{arch}-0123456789abcdef"})
    check_domains_fit(load_domains([str(tmp_path / "same")]), str(tiny_model_dir))
    with pytest.raises(DomainError, match="sibling"):
        check_domains_fit(load_domains([str(tmp_path / "same"), str(tmp_path / "sibling")]), str(tiny_model_dir))


def test_the_serve_package_imports_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, domino_ray.serve, domino_ray.serve.api, domino_ray.serve.domains\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_domino_serve_refuses_a_run_without_a_representation_before_starting_ray(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "domino_ray", "serve", "--run", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120, env={"RAY_ADDRESS": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "domain" in proc.stderr and "representation.json" in proc.stderr and str(tmp_path / "empty") in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
