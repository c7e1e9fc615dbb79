"""cluster/: every manifest parses, names entry points, configs and images that exist, and agrees with
the Dockerfile, pyproject and the example configs (a cluster file that drifts fails here, not on a
cluster)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from domino_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
APP_DIR = "/app"  # WORKDIR of cluster/Dockerfile: where the image holds jobs/ and examples/
YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in docs_of(p)]


def kind(k: str) -> list[dict]:
    return [d for _, d in all_docs() if d.get("kind") == k]


def dockerfile_image() -> str:
    """The image tag the Dockerfile's build line gives (`docker build ... -t IMAGE .`)."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    assert m, "cluster/Dockerfile must show its build command with -t IMAGE"
    return m.group(1)


def images_in(obj) -> list[str]:
    """Every `image:` value anywhere in a parsed manifest."""
    if isinstance(obj, dict):
        out = [v for k, v in obj.items() if k == "image" and isinstance(v, str)]
        return out + [i for v in obj.values() for i in images_in(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in images_in(v)]
    return []


def repo_path(path_in_image: str) -> Path:
    """/app/jobs/x.py in the image is jobs/x.py in the repo."""
    rel = path_in_image[len(APP_DIR) + 1:] if path_in_image.startswith(APP_DIR + "/") else path_in_image
    return REPO / rel


def test_cluster_has_the_expected_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "minio/minio.yaml", "aws/cluster.yaml"} <= names
    assert (CLUSTER / "Dockerfile").exists()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses_and_kubernetes_docs_are_namespaced(path):
    docs = docs_of(path)
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        if "apiVersion" in d:  # Kubernetes objects (the AWS launcher config has none)
            assert d.get("kind") and d.get("metadata", {}).get("name"), f"{path}: object without kind/name"
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "domino", f"{path}: {d['kind']} outside namespace domino"


def test_dockerfile_pins_vllm_installs_the_gpu_extra_and_tags_the_package_version():
    import tomllib

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base), f"unpinned base image {base}"
    assert '".[gpu]"' in text, "the image must install this package with the gpu extra"
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / copied).exists(), f"Dockerfile copies {copied}, which is not in the repo"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert dockerfile_image().endswith(f"/domino-ray:{version}")
    assert re.search(rf"^WORKDIR {APP_DIR}$", text, re.M)


def test_every_image_is_pinned_and_ours_match_the_dockerfile():
    ours = dockerfile_image()
    launcher = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    images = [i for _, d in all_docs() for i in images_in(d)]
    assert launcher["docker"]["image"] in images
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"unpinned image {image}"
        if "domino-ray" in image:
            assert image == ours, f"{image} is not the image cluster/Dockerfile builds ({ours})"
    assert sum(ours == i for i in images) >= 4  # head + 2 worker groups + launcher


def test_raycluster_groups_resources_and_ray_version():
    import ray

    (rc,) = kind("RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"dashboard", "gcs", "client"} <= {p["name"] for p in head["ports"]}
    assert 8265 in [p["containerPort"] for p in head["ports"]]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in cpu.get("limits", {})
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}


def test_secrets_named_by_manifests_are_documented():
    secrets = set()
    for _, d in all_docs():
        secrets |= set(re.findall(r"'name': '([\w-]+)', 'key'", str(d)))
    (rc,) = kind("RayCluster")
    secrets.add(rc["spec"]["authOptions"]["secretName"])
    docs = (REPO / "docs" / "cluster.md").read_text()
    for s in secrets - {"hf-token"}:  # hf-token is optional
        assert f"secret generic {s}" in docs, f"docs/cluster.md must say how to create the secret {s}"


def test_rayjob_entrypoint_and_config_exist_and_load():
    (job,) = kind("RayJob")
    (rc,) = kind("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]).is_file() and argv[1].startswith(APP_DIR + "/jobs/")
    config = repo_path(argv[argv.index("--config") + 1])
    cfg = load_config(config)
    assert cfg.run.output.startswith("s3://")


def test_minio_service_bucket_and_example_config_agree():
    (svc,) = [s for s in kind("Service") if s["metadata"]["name"] == "minio"]
    (dep,) = [d for d in kind("Deployment") if d["metadata"]["name"] == "minio"]
    (job,) = kind("Job")
    (pvc,) = kind("PersistentVolumeClaim")
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    api_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "api")
    cfg = load_config(REPO / "examples" / "cluster-7b.yaml")
    endpoint = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{api_port}"
    assert cfg.storage.s3.endpoint_url == endpoint
    bucket = cfg.run.output[len("s3://"):].split("/")[0]
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"mc mb --ignore-existing local/{bucket}" in script
    assert f"http://{svc['metadata']['name']}:{api_port}" in script


def test_aws_launcher_validates_against_rays_schema_and_installs_this_package():
    import os

    import jsonschema
    import ray

    cfg = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"gpu_worker", "cpu_worker"} <= set(types)
    assert re.match(r"(g|p)\d", types["gpu_worker"]["node_config"]["InstanceType"])  # a GPU instance family
    assert cfg["provider"]["type"] == "aws"
    (mount_point, source), = cfg["file_mounts"].items()
    assert source == "."
    assert any(f"pip install" in c and mount_point in c for c in cfg["setup_commands"])


def test_docs_show_the_submit_line_with_a_job_that_exists():
    docs = (REPO / "docs" / "cluster.md").read_text()
    m = re.search(r"ray job submit --address \S+ --working-dir \. (?:--runtime-env-json '[^']*' )?-- python (jobs/\S+\.py) --config (\S+)", docs)
    assert m, "docs/cluster.md must show `ray job submit ... -- python jobs/pipeline.py --config ...`"
    assert (REPO / m.group(1)).is_file()
    for word in ("dashboard", "maxReplicas", "idleTimeoutSeconds", "endpoint_url", "MinIO"):
        assert word in docs
