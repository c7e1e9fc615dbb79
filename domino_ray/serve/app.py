"""Building and running the Serve application of `domino serve` (DESIGN.md section 12).

Three ways in, one builder:
- `domino serve --run RUN [--run NAME=RUN2 ...] [--config CFG]` (and `jobs/serve.py`): `run_service`;
- `serve deploy cluster/serve/serve-config.yaml` and the KubeRay RayService: the application builder
  `domino_ray.serve.app:app_builder` with args `{runs: [...], config: PATH}`;
- tests and benchmarks: `build_app(cfg, domains)` then `serve.run`.

Config: `--config` when given, else the config stored in the first run's manifest (the one it was
learned with), else the defaults with the representation's backbone. `serve.domains` adds domains.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict
from typing import Any, Optional, Sequence

from domino_ray.config import ConfigError, DominoConfig, absolute_local_paths, config_from_dict, load_config
from domino_ray.layout import RunLayout
from domino_ray.serve.domains import Domain, check_domains_fit, load_domains, parse_run_spec
from domino_ray.storage import Storage

__all__ = ["resolve_config", "resolve_domains", "build_app", "app_builder", "run_service", "free_port"]

log = logging.getLogger(__name__)


def resolve_config(config_path: Optional[str], runs: Sequence[str]) -> DominoConfig:
    if config_path:
        return load_config(config_path)
    storage = Storage()
    for spec in runs:
        _, uri = parse_run_spec(spec)
        for root in (uri, uri.rstrip("/").rsplit("/", 1)[0]):  # a run root, or its representation folder
            manifest = RunLayout(root).manifest
            if storage.exists(manifest) and storage.read_json(manifest).get("config"):
                log.info("serve: using the config stored in %s", manifest)
                return absolute_local_paths(config_from_dict(storage.read_json(manifest)["config"], source=manifest))
    # no stored config: the defaults, on the backbone the first representation was learned on
    domains = load_domains(list(runs)[:1], storage=storage) if runs else {}
    backbone = next(iter(domains.values())).backbone if domains else None
    return DominoConfig() if not backbone else config_from_dict({"backbone": {"model": backbone}})


def resolve_domains(cfg: DominoConfig, runs: Sequence[str]) -> dict[str, Domain]:
    """The domains of `runs` and `serve.domains`, checked to fit the draft engine's model."""
    domains = load_domains(runs, cfg.serve.domains, Storage(cfg.storage.s3))
    model = cfg.synthesize.draft.engine.model or cfg.backbone.model
    check_domains_fit(domains, model, cfg.backbone.trust_remote_code)
    return domains


def _replica_options(r) -> dict[str, Any]:
    return {
        "autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                               "initial_replicas": max(r.min_replicas, 1),
                               "target_ongoing_requests": r.target_ongoing_requests},
        "max_ongoing_requests": r.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        # a dead engine core fails the health check; vLLM start-up takes minutes on big models
        "health_check_period_s": 5, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 30,
    }


def build_app(cfg: DominoConfig, domains: dict[str, Domain]):
    """The bound Serve application: ingress -> draft (+ respond) deployments."""
    from ray import serve

    from domino_ray.serve.deployments import (DRAFT_NAME, INGRESS_NAME, RESPOND_NAME, DominoIngress, RespondReplica,
                                              draft_deployment)

    s = cfg.serve
    cfg_dict = cfg.to_dict()
    domain_dicts = {name: asdict(d) for name, d in domains.items()}
    draft = serve.deployment(draft_deployment(s.max_domains_per_replica), name=DRAFT_NAME,
                             **_replica_options(s.draft)).bind(cfg_dict, domain_dicts)
    respond = None
    if s.respond:
        respond = serve.deployment(RespondReplica, name=RESPOND_NAME,
                                   **_replica_options(s.respond_replicas)).bind(cfg_dict)
    ingress = serve.deployment(DominoIngress, name=INGRESS_NAME, num_replicas=1, max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": s.ingress_num_cpus})
    return ingress.bind(draft, respond, cfg_dict, domain_dicts)


def app_builder(args: dict[str, Any]):
    """Application builder for Serve config files (cluster/serve/serve-config.yaml):

        args: {config: PATH, runs: [RUN, NAME=RUN, ...], overrides: {serve: {...}}}

    `overrides` are merged into the config file (e.g. GPUs per replica on the cluster); `runs`
    defaults to the config's run.output.
    """
    args = dict(args or {})
    runs = args.pop("runs", [])
    runs = [runs] if isinstance(runs, str) else list(runs)
    config, overrides = args.pop("config", None), args.pop("overrides", None)
    if args:
        raise ConfigError(f"serve application args: unknown keys {sorted(args)}; known: config, runs, overrides")
    if overrides and not config:
        raise ConfigError("serve application args: overrides need a config file to apply to (args.config)")
    cfg = load_config(config, overrides=overrides) if config else resolve_config(None, runs)
    runs = runs or ([] if cfg.serve.domains else [cfg.run.output])
    return build_app(cfg, resolve_domains(cfg, runs))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_service(cfg: DominoConfig, runs: Sequence[str], host: Optional[str] = None, port: Optional[int] = None) -> str:
    """Deploy the application on the Ray cluster (a local one when RAY_ADDRESS is unset); returns its URL."""
    from ray import serve

    from domino_ray.runtime import ensure_ray

    domains = resolve_domains(cfg, runs)
    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else port
    port = port or free_port("127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0")
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, domains), name=cfg.serve.app_name, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    url = f"http://{shown}:{port}"
    log.info("serve: %d domain(s) %s at %s", len(domains), sorted(domains), url)
    return url
