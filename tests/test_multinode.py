"""A local multi-node rehearsal of the cluster path: a Ray head and a second worker node, each started
with `ray start --block` (own ports, own temp dir, the worker on loopback address 127.0.0.2, stopped
by PID), the worker alone offering the `sandbox` resource as the KubeRay `cpu` group does, and a
driver on the head running the whole pipeline (tiny model, self-written tests executed in the
sandbox, LoRA merge, sandboxed evaluation) against S3 run roots on loopback (moto). It shows that every actor that ran untrusted code sat on the worker
while other actors used the head, that the merge ran in a Ray worker process, and that the driver
never built a model (no transformers model class, no peft in its modules) and stayed small."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"

# Run by the driver subprocess: the pipeline, then what the GCS knows about every actor of the run,
# and what the driver process itself loaded.
DRIVER = r"""
import json, os, resource, sys
from domino_ray.cli import main

# synthesis with the execute stage (its sandboxed tests reject every tiny-model response, so it runs
# alone), then the pipeline: learn, synthesis, finetune + merge, evaluation (sandboxed verdicts)
rc = main(["run", "--config", sys.argv[1]])
import ray
from ray._private import state
from ray.core.generated import gcs_pb2

if not ray.is_initialized():
    ray.init(address=os.environ["RAY_ADDRESS"])
actors = []
for raw in state.state._connect_and_get_accessor().get_actor_table(None, None):
    a = gcs_pb2.ActorTableData.FromString(raw)
    actors.append({"repr": a.repr_name, "class": a.class_name, "node": a.address.node_id.hex(),
                   "resources": dict(a.required_resources)})
# a model class module (modeling_llama, ...) is imported when a model is built; the auto factories are not
models = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m
                and not m.startswith("transformers.models.auto."))
print("REHEARSAL " + json.dumps({
    "rc": rc, "actors": actors, "driver_pid": os.getpid(), "driver_node": ray.get_runtime_context().get_node_id(),
    "nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()},
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "model_modules": models, "peft_loaded": "peft" in sys.modules}))
"""


def _free_ports(n: int, host: str) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_using(temp_dir: str) -> list[int]:
    """PIDs of processes whose command line names our private Ray temp dir (only ours can)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def _node_args(ip: str, temp_dir: str) -> list[str]:
    nm, om, agent_grpc, agent_http, rt_agent, metrics = _free_ports(6, ip)
    return [f"--node-ip-address={ip}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
            f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}",
            "--object-store-memory=200000000", "--disable-usage-stats", "--block"]


def _stop(procs: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGINT to each `ray start --block` (its Ctrl-C path stops what it started; it ignores SIGTERM),
    then SIGKILL to their process groups and any straggler of ours, by PID."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while time.time() < deadline and (any(p.poll() is None for p in procs) or _pids_using(temp_dir)):
        time.sleep(0.5)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=10)


def _kill_ours(temp_dir: str) -> None:
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_node(args: list[str], address_of, n: int, procs: list, env: dict, log: Path, temp_dir: str) -> str:
    """`ray start ... --block` until `n` nodes are alive; returns the GCS address. Ray gives a node 30 s
    (hard-coded) to register, which a 2-core machine under load can miss: then the attempt's
    processes are killed and it is tried again on fresh ports, three times at most."""
    for attempt in range(3):
        full, address = address_of()
        p = subprocess.Popen([RAY, "start", *args, *full], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            _wait_for_nodes(address, n, p, env, log)
            procs.append(p)
            return address
        except RuntimeError:
            if attempt == 2:
                raise
            p.wait(timeout=30)
            if n == 1:
                _kill_ours(temp_dir)  # a failed head leaves its GCS behind; a failed worker is just gone
    raise AssertionError("unreachable")


@pytest.fixture
def two_node_cluster():
    """Head (3 logical CPUs, no sandbox resource) + worker (2 CPUs, sandbox: 1); yields the GCS address."""
    temp_dir = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []
    log = Path(temp_dir) / "ray-start.log"

    def head_args():
        gcs, client = _free_ports(2, HEAD_IP)
        return ([f"--port={gcs}", f"--ray-client-server-port={client}", *_node_args(HEAD_IP, temp_dir)],
                f"{HEAD_IP}:{gcs}")

    try:
        address = _start_node(["--head", "--include-dashboard=false", "--num-cpus=3"], head_args, 1, procs, env, log, temp_dir)
        _start_node([f"--address={address}", "--num-cpus=2", '--resources={"sandbox": 1}'],
                    lambda: (_node_args(WORKER_IP, temp_dir), address), 2, procs, env, log, temp_dir)
        yield address, env
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, p: subprocess.Popen, env: dict, log: Path, timeout_s: float = 240) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"ray start exited with {p.returncode}: {log.read_text()[-2000:]}")
        try:
            out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"{n} Ray node(s) not up at {address} after {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_two_node_rehearsal_keeps_untrusted_code_on_the_sandbox_node_and_models_off_the_driver(
        two_node_cluster, tiny_model_dir, s3_server, s3_bucket, tmp_path):
    from domino_ray.storage import Storage

    address, env = two_node_cluster
    data = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    data["run"] = {"name": "rehearsal", "output": f"s3://{s3_bucket}/runs/rehearsal"}
    data["storage"] = {"s3": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region}}
    data["backbone"] = {"model": str(tiny_model_dir)}
    data["synthesize"]["num_samples"] = 4
    data["finetune"]["merge"] = True                        # the merge task, off the driver
    data["evaluate"].update(benchmark="humaneval:100:102", compare_base=False)
    data["report"] = {"enabled": False}  # its embedding pass still loads the backbone in the driver (see report)
    data["synthesize"]["respond"]["write_tests"] = True     # so the execute stage runs untrusted code
    data["synthesize"]["execute"] = {"enabled": True}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(data))

    driver_env = {**env, "RAY_ADDRESS": address, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(pipeline)], cwd=REPO, env=driver_env,
                          capture_output=True, text=True, timeout=1500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REHEARSAL ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(lines[-1][len("REHEARSAL "):])
    assert out["rc"] == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    nodes = out["nodes"]  # node id -> IP
    worker = {nid for nid, ip in nodes.items() if ip == WORKER_IP}
    head = set(nodes) - worker  # Ray may report the head under the machine's address instead of 127.0.0.1
    assert len(worker) == 1 and len(head) == 1 and out["driver_node"] in head
    untrusted = [a for a in out["actors"] if any(s in a["repr"] for s in ("VerdictStage", "SandboxStage", "ExecuteStage"))]
    assert {("ExecuteStage" in a["repr"]) for a in untrusted} == {True, False}  # synthesis and evaluation both ran
    for a in untrusted:
        assert a["node"] in worker, f"{a['repr']} ran on {nodes.get(a['node'])}, not on the sandbox node"
        assert a["resources"].get("sandbox") == pytest.approx(0.01)
    others = [a for a in out["actors"] if a not in untrusted and "MapWorker" in a["repr"]]
    assert any(a["node"] in head for a in others), "no other actor used the head: placement shows nothing"
    assert not [a for a in out["actors"] if a not in untrusted and "sandbox" in a["resources"]]

    manifest = Storage(s3_server).read_json(f"s3://{s3_bucket}/runs/rehearsal/manifest.json")["stages"]
    exported = manifest["finetune"]["exported_on"]
    assert exported["pid"] != out["driver_pid"] and exported["node_id"] in nodes
    assert manifest["finetune"]["merged"].endswith("/finetune/merged")
    assert out["model_modules"] == [] and out["peft_loaded"] is False, out
    print(f"rehearsal: driver peak RSS {out['maxrss_mb']:.0f} MiB; {len(untrusted)} sandbox actors on {WORKER_IP}; "
          f"merge on node {nodes[exported['node_id']]} pid {exported['pid']}")
