"""Tests of the `domino` command line run as users run it (a subprocess): `config --example` and `--check`,
`backbone tiny`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from domino_ray.config import DominoConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("domino")
DOMINO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "domino_ray.cli"]


def domino(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DOMINO, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_config_example_prints_a_config_that_loads_back():
    proc = domino("config", "--example")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# domino-ray config")
    assert config_from_dict(yaml.safe_load(proc.stdout)).to_dict() == DominoConfig().to_dict()


def test_config_check_prints_the_resolved_config(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("preset: tiny\nlearn:\n  lambda: 0.0\n")
    proc = domino("config", "--check", str(good))
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["learn"]["lambda"] == 0.0 and resolved["learn"]["num_domain_tokens"] == 8  # tiny preset


def test_config_check_of_a_bad_file_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learn:\n  lamda: 0.5\nsynthesize:\n  draft:\n    pool:\n      num_cpu: 1\n")
    proc = domino("config", "--check", str(bad))
    assert proc.returncode == 2
    assert "learn.lamda: unknown key" in proc.stderr
    assert "synthesize.draft.pool.num_cpu: unknown key" in proc.stderr
    assert str(bad) in proc.stderr and proc.stdout == ""


def test_config_without_a_flag_says_what_to_do():
    proc = domino("config")
    assert proc.returncode == 2 and "--example" in proc.stderr


def test_config_command_does_not_import_heavy_libraries():
    # `domino config` must stay fast: torch, transformers, ray and vllm are imported only by the jobs.
    code = ("import sys, io, contextlib; from domino_ray.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): rc = main(['config', '--example'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules)\n"
            "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "0 []", proc.stdout + proc.stderr


@pytest.mark.slow
def test_backbone_tiny_builds_a_loadable_model(tmp_path, tiny_model_dir):
    import json

    out = tmp_path / "tiny"
    proc = domino("backbone", "tiny", "--out", str(out), "--seed", "3", "--pretrain-steps", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)  # prints where it wrote the model
    meta = json.loads((out / "domino_tiny.json").read_text())
    assert meta["seed"] == 3 and meta["pretrain_steps"] == 0 and meta["final_loss"] is None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (256, 2)
    assert model.config.vocab_size == len(tok) and tok.eos_token_id is not None and tok.pad_token_id is not None
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level BPE round trip
    # the tokenizer is trained on the same local sources as the test fixture's (built in-process, seed 0,
    # pretrained): same vocabulary; the weights differ (seed 3, no pretraining)
    assert (out / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    assert (out / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
