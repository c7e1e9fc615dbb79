"""The run-root lock (domino_ray/runlock.py) on local disk and on a real S3 endpoint on loopback (moto),
and the refusal of a local run root on a multi-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from domino_ray.runlock import RunLock, RunRootLocked, hold_run_root, job_identity, local_root_problem
from domino_ray.storage import Storage
from tests.test_multinode import two_node_cluster  # noqa: F401  (a fixture: head + worker node)

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_second_job_is_refused_naming_the_holder_and_the_way_out(store_root):
    storage, root = store_root
    first = RunLock(storage, root, job_id="ray-job:raysubmit_first").acquire()
    with pytest.raises(RunRootLocked) as e:
        RunLock(storage, root, job_id="ray-job:raysubmit_second").acquire()
    message = str(e.value)
    assert "ray-job:raysubmit_first" in message and "--break-lock" in message and root in message
    assert storage.exists(f"{root}/.lock")
    assert json.loads(storage.read_text(f"{root}/.lock"))["job_id"] == "ray-job:raysubmit_first"
    first.release()
    assert not storage.exists(f"{root}/.lock")
    second = RunLock(storage, root, job_id="ray-job:raysubmit_second").acquire()  # free again after release
    assert json.loads(storage.read_text(f"{root}/.lock"))["job_id"] == "ray-job:raysubmit_second"
    second.release()


def test_a_stale_lease_is_taken_over_and_the_old_holder_can_neither_renew_nor_delete_it(store_root):
    storage, root = store_root
    clock = Clock()
    old = RunLock(storage, root, job_id="old", lease_s=60, clock=clock).acquire()
    clock.t += 59  # still live one second before expiry
    with pytest.raises(RunRootLocked, match="old"):
        RunLock(storage, root, job_id="new", lease_s=60, clock=clock).acquire()
    clock.t += 2
    new = RunLock(storage, root, job_id="new", lease_s=60, clock=clock).acquire()
    assert new.took_over["job_id"] == "old"
    with pytest.raises(RunRootLocked, match="taken over"):
        old.renew()
    old.release()  # must not delete the new holder's lock
    assert json.loads(storage.read_text(f"{root}/.lock"))["job_id"] == "new"
    new.release()
    assert not storage.exists(f"{root}/.lock")


def test_renewing_moves_the_lease_so_a_live_job_is_not_taken_over(store_root):
    storage, root = store_root
    clock = Clock()
    lock = RunLock(storage, root, job_id="live", lease_s=60, clock=clock).acquire()
    clock.t += 50
    lock.renew()
    clock.t += 50  # 100 s after the start, 50 s after the renewal
    with pytest.raises(RunRootLocked, match="live"):
        RunLock(storage, root, job_id="other", lease_s=60, clock=clock).acquire()
    assert json.loads(storage.read_text(f"{root}/.lock"))["expires_at"] == pytest.approx(1_000_000 + 50 + 60)
    lock.release()


def test_break_lock_takes_a_live_lock(store_root):
    storage, root = store_root
    RunLock(storage, root, job_id="crashed").acquire()  # never released: its process "died"
    lock = RunLock(storage, root, job_id="rescuer").acquire(break_lock=True)
    assert lock.took_over["job_id"] == "crashed"
    assert json.loads(storage.read_text(f"{root}/.lock"))["job_id"] == "rescuer"
    lock.release()


def test_two_jobs_that_find_the_same_stale_lock_cannot_both_take_it(store_root):
    storage, root = store_root
    clock = Clock()
    RunLock(storage, root, job_id="dead", lease_s=10, clock=clock).acquire()
    clock.t += 11
    a, b = (RunLock(storage, root, job_id=j, lease_s=10, clock=clock) for j in ("a", "b"))
    # both read the expired lock before either replaces it (the interleaving a race can produce)
    raw, seen = a._backend.read()
    assert b._backend.read() == (raw, seen)
    assert a._backend.replace(a._body(), seen) is not None
    assert b._backend.replace(b._body(), seen) is None
    assert json.loads(storage.read_text(f"{root}/.lock"))["job_id"] == "a"
    with pytest.raises(RunRootLocked, match="job a "):
        b.acquire()  # and through the public path b now sees a's live lease


def test_concurrent_acquirers_on_local_disk_exactly_one_wins(tmp_path):
    storage = Storage()
    for round_ in range(10):
        root = str(tmp_path / f"run{round_}")
        locks = [RunLock(storage, root, job_id=f"j{i}") for i in range(6)]
        barrier, won, refused = threading.Barrier(len(locks)), [], []

        def go(lock):
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock.job_id)
            except RunRootLocked:
                refused.append(lock.job_id)

        threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        assert json.loads(Path(root, ".lock").read_text())["job_id"] == won[0]


def test_the_heartbeat_renews_the_lease(store_root):
    storage, root = store_root
    lock = RunLock(storage, root, job_id="beating", lease_s=30).acquire()
    first = json.loads(storage.read_text(f"{root}/.lock"))["expires_at"]
    lock.start_heartbeat(every_s=0.05)
    deadline = time.time() + 30
    while json.loads(storage.read_text(f"{root}/.lock"))["expires_at"] <= first:
        assert time.time() < deadline, "the heartbeat never renewed the lease"
        time.sleep(0.05)
    lock.release()
    assert not storage.exists(f"{root}/.lock")


def test_hold_run_root_releases_on_failure(tmp_path):
    storage, root = Storage(), str(tmp_path / "run")
    with pytest.raises(ZeroDivisionError):
        with hold_run_root(root, storage, job_id="failing"):
            assert Path(root, ".lock").exists()
            1 / 0
    assert not Path(root, ".lock").exists()


def test_a_job_stopped_with_sigterm_releases_the_lock(tmp_path):
    root = tmp_path / "run"
    code = ("import sys, time; from domino_ray.runlock import hold_run_root; from domino_ray.storage import Storage\n"
            "with hold_run_root(sys.argv[1], Storage(), job_id='stopped'):\n"
            "    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert (root / ".lock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (root / ".lock").exists()


def test_the_cli_refuses_a_run_root_another_job_holds(tmp_path, capsys):
    from domino_ray.cli import main

    root = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "r", "output": str(root)}}))
    holder = RunLock(Storage(), str(root), job_id="ray-job:raysubmit_holder").acquire()
    try:
        for command in ("learn", "synthesize", "finetune", "evaluate", "run", "study"):
            assert main([command, "--config", str(cfg)]) == 2, command
            err = capsys.readouterr().err
            assert f"domino {command}: error:" in err and "ray-job:raysubmit_holder" in err and "--break-lock" in err
    finally:
        holder.release()
    assert sorted(p.name for p in root.iterdir()) == []  # no stage wrote anything


# ------------------------------------------------------------------------------------- identity
def test_job_identity_is_the_submission_id_under_ray_job_submit():
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_abc123", "job_name": "raysubmit_abc123"}})}
    assert job_identity(env) == "ray-job:raysubmit_abc123"
    assert job_identity({}) == f"{os.uname().nodename}:pid{os.getpid()}"
    assert job_identity({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}).endswith(f":pid{os.getpid()}")


# ---------------------------------------------------------------------------- multi-node refusal
def _node(ip: str, alive: bool = True) -> dict:
    return {"NodeID": ip.replace(".", ""), "NodeManagerAddress": ip, "Alive": alive}


def test_a_local_run_root_is_refused_on_more_than_one_alive_node():
    two = [_node("10.0.0.1"), _node("10.0.0.2")]
    problem = local_root_problem("/data/runs/r1", two)
    assert problem and "2 alive nodes" in problem and "10.0.0.1, 10.0.0.2" in problem and "s3://" in problem
    assert local_root_problem("s3://bucket/runs/r1", two) is None
    assert local_root_problem("/data/runs/r1", [_node("10.0.0.1")]) is None
    assert local_root_problem("/data/runs/r1", [_node("10.0.0.1"), _node("10.0.0.2", alive=False)]) is None
    assert local_root_problem("/data/runs/r1", []) is None



@pytest.mark.slow
def test_a_local_run_root_is_refused_on_a_real_two_node_cluster(two_node_cluster, tmp_path):
    """A driver that joins a head + worker cluster (tests/test_multinode.py) is refused before any stage runs."""
    address, env = two_node_cluster
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "r", "output": str(tmp_path / "run")}}))
    proc = subprocess.run([sys.executable, "-m", "domino_ray", "learn", "--config", str(cfg)], cwd=REPO,
                          env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 alive nodes" in proc.stderr and "Use an s3:// run.output" in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_job_that_wrote_nothing_leaves_no_run_root_but_one_that_wrote_keeps_it(tmp_path):
    storage = Storage()
    with pytest.raises(ValueError):
        with hold_run_root(str(tmp_path / "empty"), storage, job_id="x"):
            raise ValueError("bad config found by the stage")
    assert not (tmp_path / "empty").exists()
    with hold_run_root(str(tmp_path / "kept"), storage, job_id="x"):
        storage.write_text(str(tmp_path / "kept" / "manifest.json"), "{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["manifest.json"]


def test_a_job_whose_lock_was_broken_while_it_ran_ends_with_an_error(tmp_path):
    storage, root = Storage(), str(tmp_path / "run")
    with pytest.raises(RunRootLocked, match="lost the run-root lock.*rescuer"):
        with hold_run_root(root, storage, job_id="slow") as lock:
            RunLock(storage, root, job_id="rescuer").acquire(break_lock=True)
            with pytest.raises(RunRootLocked, match="taken over"):
                lock.renew()  # what the heartbeat does; it finds the lock taken
    assert json.loads(Path(root, ".lock").read_text())["job_id"] == "rescuer"  # left to its holder


def test_break_lock_on_the_command_line_takes_the_root_for_this_job(tmp_path):
    from domino_ray.cli import _held, build_parser

    root = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "r", "output": str(root)}}))
    RunLock(Storage(), str(root), job_id="ray-job:raysubmit_crashed").acquire()  # never released
    args = build_parser().parse_args(["synthesize", "--config", str(cfg), "--break-lock"])
    with _held(args) as loaded:
        assert loaded.run.output == str(root)
        assert json.loads((root / ".lock").read_text())["job_id"] == job_identity()
    assert not (root / ".lock").exists()


def _entry_points():
    from domino_ray.evaluate import run_evaluate, score_samples
    from domino_ray.finetune import run_finetune
    from domino_ray.learn import run_learn
    from domino_ray.pipeline import run_pipeline
    from domino_ray.study import run_study
    from domino_ray.synthesize import run_synthesize

    return {"learn": run_learn, "synthesize": run_synthesize, "finetune": run_finetune, "evaluate": run_evaluate,
            "score_samples": lambda cfg: score_samples(cfg, "/nonexistent/samples.jsonl"), "pipeline": run_pipeline,
            "study": run_study}


@pytest.mark.parametrize("stage", ["learn", "synthesize", "finetune", "evaluate", "score_samples", "pipeline", "study"])
def test_a_library_caller_is_refused_while_another_job_holds_the_root(store_root, stage):
    """Python callers are held as the command line is: a stage entry point refuses a held run root
    before it writes anything, and names the holder."""
    from domino_ray.config import config_from_dict

    storage, root = store_root
    cfg = config_from_dict({"run": {"name": "r", "output": root}, "storage": {"s3": storage.s3.model_dump()}})
    other = RunLock(storage, root, job_id="ray-job:raysubmit_other").acquire()
    try:
        with pytest.raises(RunRootLocked, match="raysubmit_other"):
            _entry_points()[stage](cfg)
        assert storage.list_files(root) == [f"{root}/.lock"]  # refused before writing anything
    finally:
        other.release()


def test_holds_nest_in_one_thread_and_another_thread_is_refused(tmp_path):
    storage, root = Storage(), str(tmp_path / "run")
    refusals = []

    def from_another_thread() -> None:
        try:
            with hold_run_root(root, storage, job_id="thread"):
                pass
        except RunRootLocked as e:
            refusals.append(str(e))

    with hold_run_root(root, storage, job_id="outer") as outer:
        with hold_run_root(root + "/", storage, job_id="inner") as inner:  # the same root, spelled with a slash
            assert inner is outer
        assert json.loads(Path(root, ".lock").read_text())["job_id"] == "outer"  # the inner exit kept it
        t = threading.Thread(target=from_another_thread)
        t.start()
        t.join()
        assert len(refusals) == 1 and "outer" in refusals[0]
    assert not Path(root, ".lock").exists()
    with hold_run_root(root, storage, job_id="after") as again:  # free once the outer block ends
        assert again is not outer
