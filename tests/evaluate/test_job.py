"""`domino evaluate` and jobs/evaluate.py as users run them (fast paths: argument and config errors
that must fail before any cluster work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from domino_ray.cli import main
from domino_ray.evaluate import result_name

REPO = Path(__file__).resolve().parents[2]


def test_job_entry_point_help():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--lora" in proc.stdout and "pass@k" in proc.stdout


def test_unknown_benchmark_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  output: {tmp_path / 'run'}\nevaluate:\n  benchmark: mbpp:foo.jsonl\n")
    assert main(["evaluate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'mbpp'" in err and "livecodebench" in err
    assert not (tmp_path / "run").exists()  # no manifest, no output


def test_result_names_are_filesystem_safe():
    assert result_name("./runs/tiny-backbone", None) == "tiny-backbone"
    assert result_name("Qwen/Qwen2.5-Coder-7B", None) == "Qwen--Qwen2.5-Coder-7B"
    assert result_name("s3://bucket/runs/x/finetune/merged", None) == "merged"
    assert result_name("/models/base", "/runs/r/finetune/adapter") == "base+adapter"


def test_evaluate_and_sandbox_import_no_ray_or_engines():
    code = ("import sys, domino_ray.evaluate, domino_ray.sandbox\n"
            "heavy = [m for m in ('ray', 'torch', 'vllm', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
