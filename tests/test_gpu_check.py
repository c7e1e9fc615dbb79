"""benchmarks/gpu_check.py runs on an image with torch, transformers and peft only (no Ray, no vLLM, no
pydantic, no S3 clients): its --smoke path runs here, and must not have imported any of those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# boto3 is left out: accelerate imports it when it happens to be installed (guarded, optional)
ABSENT = ("ray", "vllm", "pydantic", "moto", "fastapi", "s3fs")

RUNNER = f"""
import json, runpy, sys
sys.argv = ["gpu_check.py", "--smoke", "--device", "cpu"]
try:
    runpy.run_path({str(REPO / "benchmarks" / "gpu_check.py")!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({{"imported": sorted(m for m in sys.modules if m.split('.')[0] in {ABSENT!r})}}))
"""


def test_gpu_check_smoke_runs_without_ray_vllm_or_pydantic():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"imported": []}  # nothing the GPU image lacks
    summary = json.loads(lines[-2])["gpu_check"][0]
    objective = summary["objective"]
    assert objective["ours"]["s"] > 0 and objective["released"]["s"] > 0 and objective["speedup"] > 0
    assert objective["ours"]["chunk_rows"] is not None  # chunk_rows auto was resolved
    assert summary["engine"]["new_tokens"] > 0 and summary["engine"]["tokens_per_s"] > 0
    assert summary["sft"]["s"] > 0 and summary["sft"]["trainable_params"] > 0
    for line in ("objective step P=Q=8", "hf engine, soft prefix 8", "LoRA SFT step"):
        assert line in out.stdout
