"""`domino evaluate` and jobs/evaluate.py as users run them: argument and config errors that must
fail before any cluster work, and `--model` / `--lora` end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _lora_adapter(model_dir, out):
    """A peft LoRA adapter on the tiny model with random non-zero lora_B (peft's zero init would
    leave generations unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def _greedy(model, tok, prompt: str, max_new: int) -> str:
    import torch

    from domino_ray.evaluate.programs import CODE_STOPS, truncate_at_stops

    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
    return truncate_at_stops(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), CODE_STOPS)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_cli_model_and_lora(ray_cluster, tiny_model_dir, tmp_path):
    """README: `domino evaluate --model M --lora DIR`. The completions are those of M, and of M with
    the adapter, as transformers and peft generate them greedily on their own."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.evaluate.test_run import tiny_eval_config

    adapter = _lora_adapter(tiny_model_dir, tmp_path / "adapter")
    cfg = tmp_path / "cfg.json"
    conf = tiny_eval_config(tiny_model_dir, str(tmp_path / "run"), benchmark="humaneval:0:2", num_samples=1,
                            k=[1], sampling={"temperature": 0.0, "max_tokens": 12})
    conf["evaluate"]["engine"]["model"] = str(tmp_path / "no-such-model")  # --model must win over the config
    cfg.write_text(json.dumps(conf))
    assert main(["evaluate", "--config", str(cfg), "--model", str(tiny_model_dir), "--name", "base"]) == 0
    assert main(["evaluate", "--config", str(cfg), "--model", str(tiny_model_dir), "--lora", str(adapter)]) == 0
    name = result_name(str(tiny_model_dir), str(adapter))
    assert name == f"{tiny_model_dir.name}+adapter"
    run = tmp_path / "run" / "eval"
    summary = json.loads((run / name / "summary.json").read_text())
    assert summary["model"] == str(tiny_model_dir) and summary["lora"] == str(adapter) and summary["name"] == name
    base = pq.read_table(run / "base" / "results.parquet").column("completion").to_pylist()
    lora = pq.read_table(run / name / "results.parquet").column("completion").to_pylist()

    from domino_ray.evaluate import load_benchmark

    prompts = [p.prompt for p in load_benchmark("humaneval:0:2")]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    assert base == [_greedy(model, tok, p, 12) for p in prompts]
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    assert lora == [_greedy(peft_model, tok, p, 12) for p in prompts]
    assert lora != base
