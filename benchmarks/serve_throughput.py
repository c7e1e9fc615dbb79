"""Service throughput and latency against batch synthesis (measured, not asserted).

Same machine, same run, same engine kind and model, same sampling:
1. batch: `run_synthesize` with the draft stage only (one actor), steady-state samples/s (after the first
   written block, so actor start-up is excluded);
2. service: `domino serve` on the same representation (one draft replica, the same CPUs as the actor),
   called over HTTP by concurrent clients, for requests of n=1 and n=16: samples/s under load and
   p50/p95 request latency. One warm-up request per phase is not timed.
Goal: the service within 0.8x of batch throughput under load.

    python benchmarks/serve_throughput.py                          # vLLM when usable, else HF
    python benchmarks/serve_throughput.py --engine hf --n 256 --max-tokens 16
    python benchmarks/serve_throughput.py --clients 16 --requests-16 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from synth_throughput import draft_only_config, save_tiny_representation, tiny_model  # noqa: E402


def batch_throughput(cfg) -> dict:
    from domino_ray.synthesize import run_synthesize

    summary = run_synthesize(cfg)
    return {"steady": summary["steady_samples_per_second"], "end_to_end": summary["samples_per_second"]}


def load_phase(url: str, n: int, requests: int, clients: int, max_tokens: int) -> dict:
    import httpx

    body = {"n": n, "max_tokens": max_tokens, "stream": False}

    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/domains/bench/samples", json={**body, "start": i * n})
        r.raise_for_status()
        assert len(r.json()["records"]) == n
        return time.perf_counter() - t0

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients * 2)) as client:
        one(10_000)  # warm-up: domain load, first batch
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20)
    return {"samples_per_second": n * requests / wall, "p50": statistics.median(latencies), "p95": q[18],
            "requests": requests, "clients": clients}


def service_throughput(cfg, root: str, args) -> dict:
    from ray import serve

    from domino_ray.serve.app import build_app, free_port, resolve_domains

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, resolve_domains(cfg, [f"bench={root}"])), name="bench", route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        return {1: load_phase(url, 1, args.requests_1, args.clients, args.max_tokens),
                16: load_phase(url, 16, args.requests_16, args.clients, args.max_tokens)}
    finally:
        serve.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the cached tiny backbone)")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"])
    p.add_argument("--n", type=int, default=512, help="samples of the batch run")
    p.add_argument("--batch", type=int, default=64, help="batch run: engine batch size (pool.batch_size)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--requests-1", type=int, default=128, help="requests of n=1")
    p.add_argument("--requests-16", type=int, default=32, help="requests of n=16")
    args = p.parse_args()

    import ray

    from domino_ray.config import config_from_dict
    from domino_ray.engines import select_engine_kind

    engine = select_engine_kind(args.engine)[0]
    model = tiny_model(args.model)
    root = tempfile.mkdtemp(prefix="serve-bench-")
    save_tiny_representation(model, root)
    data = draft_only_config(model, root, args.n, args.batch, args.batch, args.max_tokens, engine)
    data["serve"] = {"max_samples": 64, "chunk_size": 16,
                     "draft": {"num_cpus": 0.5, "max_ongoing_requests": 256, "target_ongoing_requests": 64}}
    cfg = config_from_dict(data)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        batch = batch_throughput(cfg)
        served = service_throughput(cfg, root, args)
    finally:
        ray.shutdown()
    print(f"[serve throughput] engine={engine} max_tokens={args.max_tokens} clients={args.clients} "
          f"(batch: N={args.n}, batch_size={args.batch}, one actor; service: one draft replica, same CPUs)")
    print(f"  batch synthesis, steady state : {batch['steady']:8.2f} samples/s (end to end {batch['end_to_end']:.2f})")
    for n, r in served.items():
        print(f"  service, n={n:<2} x {r['requests']:>3} requests : {r['samples_per_second']:8.2f} samples/s   "
              f"ratio {r['samples_per_second'] / batch['steady']:.3f} (goal >= 0.8)   latency p50 {r['p50']:.2f} s, "
              f"p95 {r['p95']:.2f} s")


if __name__ == "__main__":
    main()
