"""jobs/: thin entry points. The library never imports them, light imports stay light, and every job
parses its arguments and documents its `ray job submit` line with files that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.py"))
HEAVY = ("torch", "transformers", "vllm", "ray", "peft")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_library_never_imports_jobs_statically():
    offenders = []
    for path in sorted((REPO / "domino_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n == "jobs" or n.startswith("jobs.")]
    assert not offenders


def test_importing_the_library_imports_no_job_module(tmp_path):
    # Run outside the checkout, as an installed library is used: `import jobs` must fail there, since
    # jobs/ is a folder of scripts the package does not ship (torchtune's test_import_recipes rule).
    proc = run_python(
        "import sys, importlib\n"
        "for m in ('domino_ray', 'domino_ray.cli', 'domino_ray.pipeline', 'domino_ray.finetune'):\n"
        "    importlib.import_module(m)\n"
        "assert not [m for m in sys.modules if m == 'jobs' or m.startswith('jobs.')], sys.modules.keys()\n"
        "try:\n    import jobs.pipeline\nexcept ImportError:\n    print('ok')\n", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_config_cli_pipeline_and_finetune_modules_import_no_heavy_library(tmp_path):
    proc = run_python(
        "import sys\n"
        "import domino_ray.config, domino_ray.cli, domino_ray.pipeline, domino_ray.finetune\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_help_runs_without_heavy_imports(job):
    proc = subprocess.run([sys.executable, str(job), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--output" in proc.stdout


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_docstring_shows_its_submit_line_with_existing_files(job):
    doc = ast.get_docstring(ast.parse(job.read_text())) or ""
    assert f"python jobs/{job.name}" in doc and "ray job submit" in doc, f"{job.name}: no `ray job submit` line"
    for config in re.findall(r"--config (examples/\S+)", doc):
        assert (REPO / config).is_file(), f"{job.name} names {config}, which does not exist"


def test_every_example_config_loads():
    from domino_ray.config import load_config

    examples = sorted((REPO / "examples").rglob("*.yaml"))
    assert {"quickstart.yaml", "tiny.yaml", "cluster-7b.yaml"} <= {p.name for p in examples}
    for path in examples:
        load_config(path)
        assert path.read_text().startswith("#"), f"{path.name} must open with a comment giving its run command"
