"""Shared fixtures: a real tiny backbone, a real local Ray cluster, a real S3 endpoint on loopback.

Nothing here is mocked: the tiny model is built by `domino_ray.backbone.build_tiny_backbone` (cached
under .cache/ between runs), Ray is a real single-node cluster with its own temp dir, and S3 is moto's
threaded HTTP server on 127.0.0.1 reached through the real pyarrow and boto3 clients.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 enables token auth by default
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# torch's OpenMP threads spin while waiting by default; with Ray actors, vLLM and torch sharing 2 cores
# that made HF generation 10-30x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train's controller takes workers' reports every 2 s by default and every checkpointed report
# waits for it, as does the end of a run: tiny test runs spent most of their time there. The driver
# hands the setting to the controller and its workers (ray.train.v2 ENV_VARS_TO_PROPAGATE).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DOMINO_TEST_CACHE", REPO / ".cache"))
TINY_PRETRAIN_STEPS = 120  # enough for Python-looking text; ~25 s on 2 cores


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A real tiny Llama + BPE tokenizer, built once and cached (file lock: parallel runs share it)."""
    from domino_ray.backbone import build_tiny_backbone

    out = CACHE / f"tiny-backbone-s0-p{TINY_PRETRAIN_STEPS}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "domino_tiny.json").exists():
            tmp = CACHE / f".tiny-build-{uuid.uuid4().hex[:8]}"
            build_tiny_backbone(tmp, seed=0, pretrain_steps=TINY_PRETRAIN_STEPS)
            tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster of its own (never joins another), 4 logical CPUs on 2 cores so that
    actor pools cannot starve Ray Data's read/write tasks (DESIGN section 10)."""
    import ray

    from domino_ray.placement import local_node_resources

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ctx = ray.init(
        address="local",
        num_cpus=4,
        resources=local_node_resources(),  # the sandbox pools' resource (domino_ray/placement.py)
        object_store_memory=400 * 1024**2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                  "OMP_WAIT_POLICY": "PASSIVE"}},
    )
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on loopback; yields the S3Config that points at it."""
    from moto.server import ThreadedMotoServer

    from domino_ray.config import S3Config

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    cfg = S3Config(endpoint_url=f"http://{host}:{port}", region="us-east-1",
                   access_key_id="testing", secret_access_key="testing")
    # Ray workers and subprocesses read credentials the standard way.
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield cfg
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server; yields its name."""
    from domino_ray.storage import Storage

    name = f"test-{uuid.uuid4().hex[:10]}"
    Storage(s3_server).boto3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """(storage, root URI): a local folder, and a prefix in a fresh bucket on the loopback S3 server,
    for tests that must hold on both kinds of storage."""
    from domino_ray.storage import Storage

    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(s3), f"s3://{bucket}/prefix"
