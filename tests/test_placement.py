"""Untrusted code runs only on sandbox-capable nodes: the pools that run it ask for the `sandbox` Ray
resource (and no other pool does), the local Ray that domino starts offers it, and a sandbox that
cannot start is told which capability its container lacks (real bubblewrap failures, reproduced
by dropping the capability with setpriv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from domino_ray.config import SandboxPoolConfig, config_from_dict
from domino_ray.placement import SANDBOX_RESOURCE, explain_isolation_failure, missing_resources

REPO = Path(__file__).resolve().parents[1]
WANT = {SANDBOX_RESOURCE: 0.01}


# ------------------------------------------------------------------------------------ the config
def test_sandbox_pools_ask_for_the_resource_even_when_a_config_sets_their_sizes():
    cfg = config_from_dict({"sandbox": {"pool": {"min_actors": 3, "max_actors": 9}},
                            "synthesize": {"respond": {"write_tests": True},
                                           "execute": {"enabled": True, "pool": {"num_cpus": 1}}}})
    assert cfg.sandbox.pool.min_actors == 3 and cfg.sandbox.pool.resources == WANT
    assert cfg.synthesize.execute.pool.num_cpus == 1 and cfg.synthesize.execute.pool.resources == WANT
    off = config_from_dict({"sandbox": {"pool": {"resources": {}}}})
    assert off.sandbox.pool.resources == {}
    assert not hasattr(cfg.synthesize.draft.pool, "resources")  # LLM pools go wherever GPUs are


def test_missing_resources_names_custom_resources_no_node_has_enough_of():
    head = {"CPU": 0.0, "memory": 1e9}
    gpu = {"CPU": 8.0, "GPU": 1.0}
    cpu = {"CPU": 16.0, "sandbox": 1.0}
    assert missing_resources({"sandbox": 0.01, "CPU": 1}, [head, gpu]) == ["sandbox"]
    assert missing_resources({"sandbox": 0.01}, [head, gpu, cpu]) == []
    assert missing_resources({"sandbox": 2.0}, [cpu]) == ["sandbox"]
    assert missing_resources({"CPU": 64, "GPU": 8}, [head]) == []  # Ray reports those itself


# ----------------------------------------------------------------------------------- the plans
def _ops(ds) -> dict[str, dict]:
    """name -> Ray remote args of every operator of a lazy Ray Data plan."""
    out, todo = {}, [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        out[op.name] = dict(getattr(op, "ray_remote_args", None) or {})
        todo.extend(op.input_dependencies)
    return out


def test_only_the_pools_that_run_untrusted_code_request_the_sandbox_resource(ray_cluster, tmp_path):
    import ray

    from domino_ray.evaluate.run import _score
    from domino_ray.synthesize.run import SynthPaths, _Inputs, build_synthesis_plan

    cfg = config_from_dict({"run": {"output": str(tmp_path / "run")}, "synthesize": {
        "respond": {"write_tests": True}, "execute": {"enabled": True}}})
    plan = _ops(build_synthesis_plan(cfg, [0], _Inputs(None, None, "tiny", "", "Write"), SynthPaths(cfg.run.output)))
    (execute,) = [args for name, args in plan.items() if "ExecuteStage" in name]
    assert execute["resources"] == WANT
    others = {name: args for name, args in plan.items() if "ExecuteStage" not in name}
    assert {"DraftStage", "RespondStage", "JudgeStage", "BlockWriter"} <= {n.split("(")[-1].rstrip(")") for n in others}
    assert not [name for name, args in others.items() if SANDBOX_RESOURCE in (args.get("resources") or {})]

    evaluate = _ops(_score(ray.data.from_items([{"problem": "{}", "completion": ""}]), cfg.sandbox, "completion"))
    (sandbox,) = [args for name, args in evaluate.items() if "VerdictStage" in name]  # evaluation's sandbox pool
    assert sandbox["resources"] == WANT and sandbox["num_cpus"] == cfg.sandbox.pool.num_cpus
    assert not [n for n, args in evaluate.items() if "VerdictStage" not in n and "resources" in args]
    assert ray.cluster_resources().get(SANDBOX_RESOURCE, 0) >= 0.01  # the test cluster offers it

    custom = config_from_dict({"sandbox": {"pool": {"resources": {"bwrap_ok": 0.5}}}})
    evaluate = _ops(_score(ray.data.from_items([{"problem": "{}", "completion": ""}]), custom.sandbox, "completion"))
    (sandbox,) = [args for name, args in evaluate.items() if "VerdictStage" in name]
    assert sandbox["resources"] == {"bwrap_ok": 0.5}

    from domino_ray.sandbox import add_sandbox_stage  # the generic sandbox pool (benchmarks, tools)

    generic = _ops(add_sandbox_stage(ray.data.from_items([{"program": "print(1)"}]), cfg.sandbox))
    (sandbox,) = [args for name, args in generic.items() if "SandboxStage" in name]
    assert sandbox["resources"] == WANT


def test_pool_default_is_a_small_share_of_one_node():
    pool = SandboxPoolConfig()
    assert 0 < pool.resources[SANDBOX_RESOURCE] <= 0.01  # >= 100 sandbox actors fit a node offering 1


# --------------------------------------------------------------------- start-up failure messages
def _bwrap_without(cap: str) -> str:
    """stderr of a real bubblewrap sandbox start (network namespace, as root) with `cap` dropped."""
    proc = subprocess.run(["setpriv", f"--bounding-set=-{cap}", f"--inh-caps=-{cap}", "bwrap", "--unshare-net",
                           "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, f"bwrap ran without {cap}; this machine cannot show the failure"
    return proc.stderr.strip()


needs_root_bwrap = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("setpriv"),
                                      reason="needs root, bubblewrap and setpriv")


@needs_root_bwrap
def test_bwrap_without_net_admin_is_explained_as_missing_net_admin():
    err = _bwrap_without("net_admin")
    assert "RTM_NEWADDR" in err  # the message the issue saw on a pod with SYS_ADMIN only
    hint = explain_isolation_failure(err)
    assert hint and "CAP_NET_ADMIN" in hint and "SYS_ADMIN, NET_ADMIN" in hint


@needs_root_bwrap
def test_bwrap_without_sys_admin_is_explained_as_missing_sys_admin():
    hint = explain_isolation_failure(_bwrap_without("sys_admin"))
    assert hint and "CAP_SYS_ADMIN" in hint and "NET_ADMIN" not in hint.split(":")[0]


@needs_root_bwrap
def test_a_working_bwrap_and_unrelated_errors_get_no_capability_hint():
    ok = subprocess.run(["bwrap", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "true"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(["bwrap", "--ro-bind", "/", "/", "/no/such/program"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert explain_isolation_failure(missing.stderr) is None
    assert explain_isolation_failure("") is None


# ------------------------------------------------------------------------ the local Ray we start
def test_a_local_ray_started_by_domino_offers_the_sandbox_resource_and_runs_tasks_off_the_driver():
    """`domino run` without RAY_ADDRESS starts its own one-node Ray (runtime.ensure_ray): that node
    must offer the sandbox resource, or every sandbox pool would wait forever."""
    code = (
        "import os, ray\n"
        "from domino_ray.remote import run_on_worker, where_am_i\n"
        "where = run_on_worker(where_am_i, num_gpus=0)\n"
        "print(ray.cluster_resources().get('sandbox'), where['pid'] != os.getpid(), where['node_id'] is not None)\n"
        "ray.shutdown()\n")
    temp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp, OMP_WAIT_POLICY="PASSIVE")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=temp, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["1.0", "True", "True"], proc.stdout


def test_a_resource_no_node_offers_is_named_in_a_warning_once(ray_cluster, caplog):
    import logging

    from domino_ray.config import SandboxPoolConfig
    from domino_ray.remote import sandbox_remote_args

    with caplog.at_level(logging.WARNING, logger="domino_ray.remote"):
        assert sandbox_remote_args(SandboxPoolConfig()) == {"resources": WANT}  # the test cluster offers it
        assert not caplog.records
        pool = SandboxPoolConfig(resources={"gvisor_node": 0.01})
        assert sandbox_remote_args(pool) == {"resources": {"gvisor_node": 0.01}}
        sandbox_remote_args(pool)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'gvisor_node'" in warned[0] and "ray start --resources" in warned[0]
    assert sandbox_remote_args(SandboxPoolConfig(resources={})) == {}


@needs_root_bwrap
def test_the_sandbox_itself_names_the_missing_capability(tmp_path):
    """The sandbox's own start-up check (not only the image smoke script), in a process whose
    capabilities lack NET_ADMIN (a pod granted SYS_ADMIN only): it refuses, naming CAP_NET_ADMIN."""
    program = tmp_path / "p.py"
    program.write_text("print(1)\n")
    proc = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", sys.executable, "-m",
                           "domino_ray", "sandbox", "exec", "--file", str(program)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "RTM_NEWADDR" in proc.stderr and "CAP_NET_ADMIN" in proc.stderr, proc.stderr
