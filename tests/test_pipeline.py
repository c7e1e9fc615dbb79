"""pipeline: which stages a config change re-runs, how the fine-tuned model is handed to evaluation,
the printed summary; and the whole pipeline submitted to a real local Ray head with `ray job submit`."""

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

import pyarrow.parquet as pq
import pytest
import yaml

from domino_ray.config import config_from_dict
from domino_ray.pipeline import finetuned_model_args, format_summary, stage_fingerprints
from domino_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(model_dir: Path, output: str, **sections):
    data = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    data["backbone"] = {"model": str(model_dir)}
    data["run"]["output"] = output
    for name, over in sections.items():
        data[name] = {**data.get(name, {}), **over}
    return config_from_dict(data)


# ------------------------------------------------------------------------------------------ plan
def test_a_config_change_reruns_only_the_stages_that_read_it(tiny_model_dir, tmp_path):
    storage = Storage()
    base = stage_fingerprints(tiny_cfg(tiny_model_dir, str(tmp_path)), storage)
    assert list(base) == ["learn", "synthesize", "finetune", "evaluate_base", "evaluate_finetuned", "report"]

    def changed(**sections) -> set[str]:
        fps = stage_fingerprints(tiny_cfg(tiny_model_dir, str(tmp_path), **sections), storage)
        return {k for k in base if fps.get(k) != base[k]}

    assert changed(evaluate={"sampling": {"max_tokens": 17}}) == {"evaluate_base", "evaluate_finetuned", "report"}
    assert changed(finetune={"lr": 0.01}) == {"finetune", "evaluate_finetuned", "report"}
    assert changed(synthesize={"num_samples": 9}) == {"synthesize", "finetune", "evaluate_finetuned", "report"}
    assert changed(learn={"epochs": 2}) == set(base) - {"evaluate_base"}  # the base model does not change
    assert changed(report={"max_samples": 11}) == {"report"}


def test_disabled_stages_are_left_out(tiny_model_dir, tmp_path):
    fps = stage_fingerprints(tiny_cfg(tiny_model_dir, str(tmp_path), finetune={"enabled": False},
                                      report={"enabled": False}), Storage())
    assert list(fps) == ["learn", "synthesize", "evaluate_base"]
    fps = stage_fingerprints(tiny_cfg(tiny_model_dir, str(tmp_path), evaluate={"compare_base": False}), Storage())
    assert "evaluate_base" not in fps and "evaluate_finetuned" in fps


def test_finetuned_model_prefers_merged_then_full_then_base_plus_adapter(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, str(tmp_path))
    base = str(tiny_model_dir)
    assert finetuned_model_args(cfg, {"adapter": "A", "merged": "M"}, base) == {"model": "M", "lora": None}
    assert finetuned_model_args(cfg, {"model": "F"}, base) == {"model": "F", "lora": None}
    assert finetuned_model_args(cfg, {"adapter": "A"}, base) == {"model": base, "lora": "A"}


def test_summary_table_names_every_stage_and_the_delta():
    result = {"run": "/r", "seconds": 42.0,
              "stages": {"learn": {"status": "skipped", "seconds": 0.0}, "finetune": {"status": "ran", "seconds": 12.5}},
              "synthesize": {"rows": 32, "accepted": 20, "reject_reasons": {"duplicate": 12}},
              "finetune": {"steps": 8, "first_loss": 5.5, "final_loss": 3.25},
              "benchmark": "humaneval:100:164", "num_problems": 64,
              "pass_at_1": {"base": 0.0, "finetuned": 0.015625, "delta": 0.015625}, "report": "/r/report"}
    text = format_summary(result)
    assert "learn" in text and "skipped" in text and "12.5" in text
    assert "20 accepted of 32" in text and "duplicate 12" in text
    assert "loss 5.500 -> 3.250" in text
    assert "base 0.000  fine-tuned 0.016  delta +0.016" in text and "(64 problems)" in text


# ------------------------------------------------------------------------------- ray job submit
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pids_using(temp_dir: str) -> list[int]:
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


@pytest.fixture
def ray_head():
    """A private Ray head started with `ray start --block` (own ports and temp dir, auth off);
    yields the dashboard address; stops its process group and any stragglers by PID."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, rt_agent, metrics = free_ports(6)
    # the job's `python` must be this environment's, as in an activated venv
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp_dir}", "--num-cpus=4", "--resources={\"sandbox\": 1}", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, head)
        yield address, env
    finally:
        _stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {address} not up after {timeout_s} s")


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGINT to `ray start --block` (its Ctrl-C path stops every process it started, in ~3 s; it
    ignores SIGTERM), then SIGKILL to its process group and any straggler of ours, by PID."""
    head.send_signal(signal.SIGINT)
    for _ in range(60):
        if head.poll() is not None and not pids_using(temp_dir):
            return
        time.sleep(0.5)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=10)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_and_a_resubmission_skips_everything(ray_head, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    out = tmp_path / "run"
    cfg_path = tmp_path / "tiny.yaml"
    data = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    data["backbone"] = {"model": str(tiny_model_dir)}
    # The job path (working-dir upload, entry point, Ray Train and Ray Data inside a job) and the
    # resubmission; the whole pipeline on a cluster, finetune and evaluate included, is
    # tests/test_multinode.py's, and the summary's pass@k lines are tests/test_summary.py's.
    for stage in ("finetune", "evaluate", "report"):
        data.setdefault(stage, {})["enabled"] = False
    cfg_path.write_text(yaml.safe_dump(data))
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def submit(job_id: str) -> str:
        subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
             "--", "python", "jobs/pipeline.py", "--config", str(cfg_path), "--output", str(out)],
            env=env, cwd=REPO, check=False, timeout=900, capture_output=True)
        client = JobSubmissionClient(address)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
        return logs

    logs = submit("domino-first")
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    pipeline = manifest["pipeline"]
    assert pipeline["status"] == "completed"
    assert list(pipeline["stages"]) == ["learn", "synthesize"]
    assert {s["status"] for s in pipeline["stages"].values()} == {"ran"}
    for stage in ("learn", "synthesize"):
        assert manifest[stage]["status"] == "completed"
    assert (out / "representation" / "domain.safetensors").exists()
    records = sum(pq.read_metadata(f).num_rows for f in (out / "synth" / "records").glob("*.parquet"))
    assert records == data["synthesize"]["num_samples"], logs[-3000:]
    assert not (out / "finetune").exists() and not (out / "eval").exists()

    logs = submit("domino-again")
    pipeline = json.loads((out / "manifest.json").read_text())["stages"]["pipeline"]
    assert {s["status"] for s in pipeline["stages"].values()} == {"skipped"}, pipeline["stages"]
    assert "skipped" in logs


def test_local_paths_become_absolute_and_uris_hub_ids_and_specs_do_not(tmp_path, monkeypatch):
    from domino_ray.config import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs.jsonl").write_text('{"text": "x"}\n')
    cfg = absolute_local_paths(config_from_dict({
        "run": {"output": "./runs/a"}, "backbone": {"model": "./models/tiny"}, "references": {"source": "refs.jsonl"},
        "evaluate": {"engine": {"model": "Qwen/Qwen2.5-Coder-7B"}},
        "synthesize": {"respond": {"engine": {"lora_path": "~/adapter"}}}}))
    assert cfg.run.output == str(tmp_path / "runs" / "a")
    assert cfg.backbone.model == str(tmp_path / "models" / "tiny")
    assert cfg.references.source == str(tmp_path / "refs.jsonl")
    assert cfg.synthesize.respond.engine.lora_path == str(Path("~/adapter").expanduser())
    assert cfg.evaluate.engine.model == "Qwen/Qwen2.5-Coder-7B"
    s3 = absolute_local_paths(config_from_dict({"run": {"output": "s3://b/runs/x"}, "references": {"source": "humaneval:0:100"}}))
    assert s3.run.output == "s3://b/runs/x" and s3.references.source == "humaneval:0:100"


# ----------------------------------------------------------------------------- blocked stages
def test_zero_accepted_records_block_finetune_and_what_needs_it_but_not_the_rest(tiny_model_dir, tmp_path,
                                                                                 ray_cluster, monkeypatch):
    """0 accepted records is an outcome, not a crash: the real finetune stage raises NoAcceptedRecords,
    the pipeline records why, skips the stages that consume the fine-tuned model, still runs the rest,
    prints the reason, and a re-run tries the blocked stages again."""
    import domino_ray.pipeline as pipeline
    from domino_ray.finetune import load_accepted_records
    from domino_ray.manifest import RunManifest
    from domino_ray.pipeline import PipelineStage, run_pipeline
    from tests.test_finetune import write_records

    storage, run = Storage(), str(tmp_path)
    write_records(storage, run, [], rejected=3)
    cfg = tiny_cfg(tiny_model_dir, run)
    ran: list[str] = []

    def stage(name, needs=(), body=None):
        def go():
            ran.append(name)
            out = body() if body else {}
            (tmp_path / f"{name}.done").write_text("done")  # the artifact that lets a re-run skip it
            return out
        return PipelineStage(name, lambda: [name], lambda: str(tmp_path / f"{name}.done"), go, needs=needs)

    def plan(cfg, storage, state):
        return [stage("finetune", body=lambda: {"records": load_accepted_records(run, storage)}),
                stage("evaluate_base"), stage("evaluate_finetuned", needs=("finetune",)),
                stage("heldout_nll_finetuned", needs=("finetune",)), stage("report")]

    monkeypatch.setattr(pipeline, "plan_stages", plan)
    result = run_pipeline(cfg, print_summary=False)
    status = {k: v["status"] for k, v in result["stages"].items()}
    assert status == {"finetune": "blocked", "evaluate_base": "ran", "evaluate_finetuned": "blocked",
                      "heldout_nll_finetuned": "blocked", "report": "ran"}
    assert ran == ["finetune", "evaluate_base", "report"]  # nothing that needs the fine-tuned model ran
    assert "0 of 3 synthetic records are accepted" in result["stages"]["finetune"]["reason"]
    assert result["stages"]["evaluate_finetuned"]["reason"] == "needs finetune"
    record = RunManifest(storage, run).stage("pipeline")
    assert record["status"] == "completed_with_blocked_stages"
    assert "finetune" not in record["fingerprints"] and "evaluate_base" in record["fingerprints"]
    text = pipeline.format_summary(result)
    assert "BLOCKED finetune: run" in text and "'duplicate': 2" in text and "BLOCKED evaluate_finetuned: needs finetune" in text

    ran.clear()
    again = run_pipeline(cfg, print_summary=False)  # blocked stages are tried again; finished ones are not
    assert ran == ["finetune"]
    assert {k: v["status"] for k, v in again["stages"].items()} == dict(status, evaluate_base="skipped", report="skipped")
