"""Fixtures of the service tests: two tiny learned domains and a Serve application on a free port.

The domains are written with `representation.save_representation` from rows of the tiny model's own
embedding table (a real D of the right shape and scale, in milliseconds instead of a `learn` run).
`alpha` is a run root with a manifest (run name alpha, run.seed 7), `beta` a bare folder (name from
the folder, seed 0).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

ALPHA_TOKENS = [5, 9, 33, 70]  # P = 4
BETA_TOKENS = [100, 200, 300, 400, 500]  # P = 5
ALPHA_SEED = 7


@pytest.fixture(scope="session")
def serve_domains(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import save_representation
    from domino_ray.storage import Storage

    root = tmp_path_factory.mktemp("serve-domains")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    table = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach()
    meta = {"backbone": str(tiny_model_dir), "backbone_signature": backbone_signature(config),
            "reference_sha256": "ref-sha-of-alpha"}
    save_representation(str(root / "alpha"), table[ALPHA_TOKENS], meta)
    Storage().write_json(str(root / "alpha" / "manifest.json"), {"config": {"run": {"name": "alpha", "seed": ALPHA_SEED}}})
    save_representation(str(root / "beta"), table[BETA_TOKENS], {**meta, "reference_sha256": None})
    return {"alpha": root / "alpha", "beta": root / "beta"}


def service_config(model: Path, kind: str, serve: dict, synthesize: dict | None = None):
    from domino_ray.config import config_from_dict

    synth = {"draft": {"engine": {"kind": kind, "max_model_len": 128, "cpu_kv_cache_gb": 0.125},
                       "sampling": {"max_tokens": 12}}}
    for key, value in (synthesize or {}).items():
        synth[key] = {**synth.get(key, {}), **value}
    return config_from_dict({"backbone": {"model": str(model)}, "synthesize": synth, "serve": serve})


@contextlib.contextmanager
def running_service(cfg, runs):
    """Serve on a free loopback port for the duration; Serve is shut down afterwards."""
    from ray import serve

    from domino_ray.serve.app import build_app, free_port, resolve_domains

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, resolve_domains(cfg, runs)), name=cfg.serve.app_name, route_prefix="/",
                  blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
