"""The Serve config file and the KubeRay RayService: valid for Ray Serve, the same application in both,
and an application builder, config and runs that exist and fit the cluster they ask for."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "cluster" / "serve" / "serve-config.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"


def repo_path(path_in_image: str) -> Path:
    return REPO / path_in_image.removeprefix("/app/")


def test_serve_config_validates_against_serves_schema_and_builds_from_files_that_exist():
    from ray.serve.schema import ServeDeploySchema

    from domino_ray.config import load_config
    from domino_ray.serve.app import app_builder

    data = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is app_builder
    args = app["args"]
    assert set(args) <= {"config", "runs", "overrides"}
    cfg = load_config(repo_path(args["config"]), overrides=args["overrides"])  # the overrides are valid keys
    assert args["runs"] == [cfg.run.output] and cfg.run.output.startswith("s3://")
    assert cfg.serve.draft.num_gpus >= 1 and cfg.serve.respond_replicas.num_gpus >= 1 and cfg.serve.respond
    assert data["http_options"]["port"] == 8000


def test_rayservice_embeds_the_serve_config_and_has_gpus_for_its_replicas():
    import ray

    from domino_ray.config import load_config

    (svc,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    assert svc["kind"] == "RayService" and svc["metadata"]["namespace"] == "domino"
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in [p["containerPort"] for p in head["ports"]]
    (gpu,) = cluster["workerGroupSpecs"]
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    s = load_config(repo_path(app["args"]["config"]), overrides=app["args"]["overrides"]).serve
    assert gpu["minReplicas"] >= s.draft.min_replicas + s.respond_replicas.min_replicas
    assert gpu["maxReplicas"] >= s.draft.max_replicas + s.respond_replicas.max_replicas


def test_app_builder_serves_the_config_run_by_default_and_refuses_unknown_args(serve_domains, tiny_model_dir, tmp_path):
    import pytest
    from ray.serve import Application

    from domino_ray.config import ConfigError
    from domino_ray.serve.app import app_builder
    from domino_ray.serve.domains import DomainError

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "alpha", "output": str(serve_domains["alpha"])},
                                   "backbone": {"model": str(tiny_model_dir)}}))
    assert isinstance(app_builder({"config": str(cfg), "overrides": {"serve": {"max_samples": 3}}}), Application)
    with pytest.raises(ConfigError, match="unknown keys \\['replicas'\\]"):
        app_builder({"config": str(cfg), "replicas": 2})
    with pytest.raises(ConfigError, match="serve.draft.num_gpu"):
        app_builder({"config": str(cfg), "overrides": {"serve": {"draft": {"num_gpu": 1}}}})
    with pytest.raises(DomainError, match="missing"):
        app_builder({"config": str(cfg), "runs": [str(tmp_path / "missing")]})
