"""The service with the transformers engine (the fallback kind), a respond deployment and an LRU of
one domain per replica. Expected texts come from the batch plan's DraftStage and RespondStage
callables on the same engine kind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import ALPHA_SEED, running_service, service_config

pytestmark = pytest.mark.slow  # two Serve deployments with engines, ~40 s on 2 cores

SYNTH = {"draft": {"engine": {"kind": "hf", "max_model_len": 128}, "reject_truncated": False},
         "respond": {"engine": {"kind": "hf", "max_model_len": 256, "chat_template": True},
                     "sampling": {"max_tokens": 8, "temperature": 0.7}}}
SERVE = {"max_samples": 16, "chunk_size": 3, "max_domains_per_replica": 1, "respond": True,
         "draft": {"num_cpus": 0.5}, "respond_replicas": {"num_cpus": 0.5}}


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return service_config(tiny_model_dir, "hf", SERVE, SYNTH)


@pytest.fixture(scope="module")
def client(ray_cluster, cfg, serve_domains):
    with running_service(cfg, [str(serve_domains["alpha"]), str(serve_domains["beta"])]) as url:
        with httpx.Client(base_url=url, timeout=180) as c:
            yield c


def batch(cfg, serve_domains, name, run_seed, n):
    """Drafts and responses of seeds 0..n-1 from the batch plan's stage callables."""
    import numpy as np

    from domino_ray.synthesize.stages import DraftStage, RespondStage, expand_blocks

    syn = cfg.synthesize
    rules = {"respond": True, "judge": False, "reject_truncated": False}
    common = {"backbone_cfg": cfg.section_dict("backbone"), "run": name, "rules": rules}
    rows = expand_blocks({"id": np.arange(1)}, num_samples=n, block_size=n, run_seed=run_seed)
    draft = DraftStage(engine_cfg=syn.draft.engine.model_dump(), sampling=syn.draft.sampling.model_dump(),
                       representation_uri=str(serve_domains[name]), **common)
    rows = draft(rows)
    respond = RespondStage(engine_cfg=syn.respond.engine.model_dump(), sampling=syn.respond.sampling.model_dump(),
                           template=syn.respond.prompt_template, **common)
    rows = respond(rows)
    return rows["draft"].tolist(), rows["response"].tolist()


def samples(client, name, **body):
    r = client.post(f"/v1/domains/{name}/samples", json=body)
    assert r.status_code == 200, r.text
    return r.json()["records"]


def test_hf_samples_and_responses_equal_batch_synthesis(client, cfg, serve_domains):
    drafts, responses = batch(cfg, serve_domains, "alpha", ALPHA_SEED, 4)
    records = samples(client, "alpha", n=4, stages=["respond", "syntax", "dedup"])
    assert [r["draft"] for r in records] == drafts
    assert [r["response"] for r in records] == responses
    assert all(r["response_tokens"] for r in records if r["draft"].strip())
    assert all(isinstance(r["syntax_ok"], bool) for r in records)  # judged on the response
    assert all(r["accepted"] == (r["reject_reason"] is None) for r in records)
    plain = samples(client, "alpha", n=4)
    assert [r["draft"] for r in plain] == drafts and all(r["response"] is None for r in plain)
    assert all(r["syntax_ok"] is None and r["duplicate_of"] is None for r in plain)


def test_an_lru_of_one_domain_reloads_after_the_other_was_served(client):
    def loads():
        return client.get("/healthz").json()["draft"]["domains_loaded"]

    samples(client, "alpha", n=1)
    start = loads()
    samples(client, "alpha", n=1)  # held: no load
    assert loads() == start
    samples(client, "beta", n=1)  # evicts alpha
    samples(client, "alpha", n=1)  # loaded again
    assert loads() == start + 2


def test_concurrent_requests_are_batched_without_changing_any_sample(client):
    # @serve.batch puts requests of different clients into one generate call; per-row seeds keep
    # every sample what it is alone
    alone = {s: samples(client, "beta", n=3, seed=s) for s in range(6)}
    with ThreadPoolExecutor(6) as pool:
        together = dict(zip(range(6), pool.map(lambda s: samples(client, "beta", n=3, seed=s), range(6))))
    assert {s: [r["draft"] for r in v] for s, v in together.items()} == \
        {s: [r["draft"] for r in v] for s, v in alone.items()}
    assert len({alone[s][0]["draft"] for s in alone}) > 1  # seeds differ, so samples do
