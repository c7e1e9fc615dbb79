"""`domino synthesize` end to end on the tiny backbone, on a real local Ray cluster:
transformers engines writing to S3 (moto's threaded server) and read back with boto3, pyarrow,
pandas and `datasets`; vLLM (CPU build) drafting from D; a driver SIGKILLed part-way and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from domino_ray import schema
from domino_ray.config import config_from_dict
from domino_ray.runlock import hold_run_root
from domino_ray.storage import Storage
from domino_ray.synthesize import blocks, run_synthesize
from domino_ray.synthesize.export import export_records
from tests.synthesize.conftest import make_representation, synth_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def check_records(df, run: str, n: int, summary: dict) -> None:
    """What every finished output must satisfy, whichever way it was read."""
    assert sorted(df["seed_index"].tolist()) == list(range(n))
    assert df["id"].tolist() == [schema.sample_id(run, int(s)) for s in df["seed_index"]]
    assert df["draft_seed"].tolist() == [blocks.request_seed(0, int(s)) for s in df["seed_index"]]
    assert (df["accepted"] == df["reject_reason"].isna()).all()
    counts = summary["counts"]
    assert counts["rows"] == n and counts["accepted"] == int(df["accepted"].sum())
    by_reason = df["reject_reason"].value_counts().to_dict()
    assert {k: v for k, v in counts["reject_reasons"].items() if v} == by_reason
    assert summary["tokens_out"] == int(df["draft_tokens"].sum() + df["response_tokens"].fillna(0).sum()) + \
        counts["tokens"]["judge"]["out"] + counts["tokens"]["tests"]["out"]


def test_transformers_pipeline_on_s3(ray_cluster, tiny_model_dir, references_file, s3_server, s3_bucket, tmp_path):
    storage = Storage(s3_server)
    root = f"s3://{s3_bucket}/runs/hf"
    make_representation(tiny_model_dir, root, storage)
    # every stage on: draft (2 actors), respond, tests, judge, execute (sandbox actors), filter
    cfg = config_from_dict(synth_config(tiny_model_dir, root, references_file, n=16, block=4, actors=2,
                                        s3=s3_server.model_dump(), name="hf",
                                        respond={"write_tests": True, "sampling": {"max_tokens": 16}},
                                        execute={"enabled": True}))
    summary = run_synthesize(cfg)
    assert summary["status"] == "completed" and summary["blocks"] == {"total": 4, "skipped": 0, "generated": 4}
    assert summary["samples_per_second"] > 0
    # the steady rate runs from the first draft call (after the engines loaded) to the end of generation
    flow = summary["block_flow"]
    assert 0 < flow["generation_start_seconds"] < flow["first_block_seconds"] < summary["generate_seconds"]
    assert summary["steady_samples_per_second"] == pytest.approx(
        summary["rows_generated"] / (summary["generate_seconds"] - flow["generation_start_seconds"]), rel=0.01)
    began, ended = flow["generation_window"]
    assert ended - began == pytest.approx(summary["generate_seconds"] - flow["generation_start_seconds"], abs=0.01)
    assert set(summary["counts"]["stages"]) >= {"draft", "respond", "judge", "filter"}
    assert summary["counts"]["tokens"]["tests"]["out"] > 0

    # boto3: the objects, downloaded for `datasets`
    client = storage.boto3_client
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/hf/synth/records/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    assert keys == [f"runs/hf/synth/records/{blocks.block_name(b)}" for b in range(4)]
    local = []
    for key in keys:
        path = tmp_path / Path(key).name
        path.write_bytes(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        local.append(str(path))

    # pyarrow and pandas straight from S3
    table = pq.read_table(f"{s3_bucket}/runs/hf/synth/records", filesystem=storage.s3_filesystem)
    assert table.schema.remove_metadata().equals(schema.RECORD_SCHEMA)
    import pandas as pd

    df = pd.read_parquet(f"{s3_bucket}/runs/hf/synth/records", filesystem=storage.s3_filesystem)
    check_records(df, "hf", 16, summary)
    assert set(df["backbone"]) == {str(tiny_model_dir)}

    import datasets

    ds = datasets.load_dataset("parquet", data_files=local, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 16 and set(ds.column_names) == set(schema.RECORD_SCHEMA.names)

    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/hf/synth/manifest.json")["Body"].read())
    assert manifest["fingerprint"] == summary["fingerprint"] and manifest["versions"]["ray"]
    assert manifest["config"]["synthesize"]["num_samples"] == 16
    run_manifest = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/hf/manifest.json")["Body"].read())
    assert run_manifest["stages"]["synthesize"]["status"] == "completed"

    # the same config again: every block is skipped, no object is rewritten
    def etags(prefix):
        objs = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in objs}

    before = etags("runs/hf/synth/work/"), etags("runs/hf/synth/records/")
    again = run_synthesize(cfg)
    assert again["blocks"] == {"total": 4, "skipped": 4, "generated": 0} and again["attempts"] == 2
    assert (etags("runs/hf/synth/work/"), etags("runs/hf/synth/records/")) == before
    assert again["counts"] == summary["counts"]


def test_vllm_drafts_and_export(ray_cluster, tiny_model_dir, references_file, tmp_path):
    root = str(tmp_path / "run")
    make_representation(tiny_model_dir, root)
    raw = synth_config(tiny_model_dir, root, references_file, n=16, block=8, actors=1, draft_kind="vllm", name="vl",
                       judge={"enabled": False}, filter={"syntax": False, "decontaminate": ["humaneval:0:20"]})
    summary = run_synthesize(config_from_dict(raw))
    df = pq.read_table(os.path.join(root, "synth", "records")).to_pandas()
    check_records(df, "vl", 16, summary)
    import duckdb

    n, acc = duckdb.connect().execute(f"select count(*), count(*) filter (where accepted) from "
                        f"read_parquet('{root}/synth/records/*.parquet')").fetchone()
    assert (n, acc) == (16, int(df["accepted"].sum()))
    assert summary["counts"]["stages"]["draft"].get("ok", 0) + summary["counts"]["stages"]["draft"].get("truncated", 0) > 0
    accepted = int(df["accepted"].sum())
    assert accepted > 0  # judge and syntax off, truncation allowed: the tiny model's drafts pass
    out = tmp_path / "chat.jsonl"
    assert export_records(root, "chat-jsonl", str(out)) == accepted
    first = json.loads(out.read_text().splitlines()[0])
    kept = df[df["accepted"]].sort_values("seed_index").iloc[0]
    assert first["messages"] == [{"role": "user", "content": kept["draft"]},
                                 {"role": "assistant", "content": kept["response"]}]


def _process_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped writing
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_until_the_killed_jobs_actors_are_gone(deadline_s: float = 180) -> None:
    """Ray reaps the actors of a dead driver's job; poll until every non-detached actor of another job
    is DEAD and its process has exited (a writer still running could land one more block)."""
    import ray
    import ray._private.state

    me = ray.get_runtime_context().get_job_id()
    deadline = time.time() + deadline_s
    while True:
        others = [a for a in ray._private.state.actors().values() if a["JobID"] != me and not a["IsDetached"]]
        alive = [a["ActorClassName"] for a in others if a["State"] != "DEAD"]
        running = [a["ActorClassName"] for a in others if a.get("Pid") and _process_running(int(a["Pid"]))]
        if not alive and not running:
            return
        assert time.time() < deadline, f"actors of the killed job still there after {deadline_s} s: {alive or running}"
        time.sleep(0.2)


def test_resume_after_driver_sigkill(ray_cluster, tiny_model_dir, references_file, tmp_path):
    root = tmp_path / "run"
    make_representation(tiny_model_dir, str(root))
    n, bs = 32, 4
    raw = synth_config(tiny_model_dir, str(root), references_file, n=n, block=bs, name="rs",
                       draft={"pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 4},
                              "sampling": {"max_tokens": 32, "temperature": 0.9}},
                       respond={"enabled": False}, judge={"enabled": False})  # drafts only: fewer actors to start
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(raw))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address_info["address"], RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "synthesize.py"), "--config", str(cfg_path)],
                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    work = root / "synth" / "work"
    deadline = time.time() + 300
    try:
        while not list(work.glob("part-*.parquet")):
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.time() < deadline, "no block written in 300 s"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    _wait_until_the_killed_jobs_actors_are_gone()  # after that, no block of the killed run can still land
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in work.glob("part-*.parquet")}
    total = blocks.num_blocks(n, bs)
    assert 0 < len(before) < total, f"kill was not part-way: {len(before)} of {total} blocks"
    manifest = json.loads((root / "synth" / "manifest.json").read_text())
    assert manifest["status"] == "running"  # killed: nobody marked it

    lock = json.loads((root / ".lock").read_text())
    assert lock["pid"] == job.pid  # the killed job's lease outlives it: a new run must break it explicitly
    with hold_run_root(str(root), Storage(), break_lock=True):
        summary = run_synthesize(config_from_dict(raw))
    assert summary["blocks"] == {"total": total, "skipped": len(before), "generated": total - len(before)}
    assert {name: ((work / name).stat().st_mtime_ns, (work / name).stat().st_ino) for name in before} == before
    assert summary["block_flow"]["max_calls_per_block"] == 1 and summary["block_flow"]["unplanned_merges"] == 0
    df = pq.read_table(str(root / "synth" / "records")).to_pandas()
    assert len(df) == n and sorted(df["seed_index"]) == list(range(n))
    check_records(df, "rs", n, summary)
