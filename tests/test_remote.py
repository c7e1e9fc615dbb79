"""Heavy model work runs as Ray tasks, never in the driver: `run_on_worker` itself, and the LoRA
export + merge of `finetune` on the real tiny model (where it ran, and that the merged weights are
base + (alpha / r) * B @ A, computed here by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from domino_ray.config import config_from_dict
from domino_ray.remote import run_on_worker, where_am_i


def test_run_on_worker_runs_in_another_process_and_reraises_the_tasks_error(ray_cluster):
    import ray

    where = run_on_worker(where_am_i, num_gpus=0)
    assert where["pid"] != os.getpid()
    assert where["node_id"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert run_on_worker(divmod, 17, 5, num_gpus=0) == (3, 2)
    with pytest.raises(ValueError, match="invalid literal"):
        run_on_worker(int, "not a number", num_gpus=0)
    with pytest.raises(ValueError, match="num_cpus"):
        run_on_worker(where_am_i, num_cpus=0)


def _lora_checkpoint(base_dir: Path, ckpt: Path, r: int, alpha: int) -> None:
    """A Ray Train checkpoint folder as finetune's train loop writes it: adapter/ + metrics.jsonl,
    with random (non-zero) LoRA A and B so the merge changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, lora_dropout=0.0))
    peft.save_pretrained(ckpt / "adapter", safe_serialization=True)
    (ckpt / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")


def test_lora_merge_runs_in_a_ray_task_and_writes_base_plus_scaled_lora(ray_cluster, tiny_model_dir, tmp_path):
    import ray.train
    import torch
    from safetensors.torch import load_file

    from domino_ray.finetune import _export, finetune_paths

    r, alpha = 4, 8
    ckpt = tmp_path / "ckpt"
    _lora_checkpoint(tiny_model_dir, ckpt, r, alpha)
    cfg = config_from_dict({"run": {"output": str(tmp_path / "run")}, "backbone": {"model": str(tiny_model_dir)},
                            "finetune": {"method": "lora", "merge": True, "cpus_per_worker": 0.5,
                                         "lora": {"r": r, "alpha": alpha, "target_modules": ["q_proj", "v_proj"]}}})
    paths = finetune_paths(cfg.run.output)
    out = _export(cfg, paths, ray.train.Checkpoint.from_directory(str(ckpt)), str(tiny_model_dir))

    assert out["exported_on"]["pid"] != os.getpid()  # the model was loaded by a Ray worker, not here
    merged_dir = Path(out["merged"])
    assert (merged_dir / "config.json").exists() and (merged_dir / "tokenizer.json").exists()
    assert (Path(out["adapter"]) / "adapter_config.json").exists()
    assert json.loads(Path(paths["metrics"]).read_text())["loss"] == 1.0

    merged = {k: v for f in merged_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    base = {k: v for f in Path(tiny_model_dir).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    lora = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    checked = 0
    for key, w in base.items():
        if not key.endswith(("q_proj.weight", "v_proj.weight")):
            assert torch.equal(merged[key], w), key  # untouched weights are copied exactly
            continue
        stem = key[: -len(".weight")]
        a = next(v for k, v in lora.items() if k.endswith(f"{stem}.lora_A.weight"))
        b = next(v for k, v in lora.items() if k.endswith(f"{stem}.lora_B.weight"))
        expected = w + (alpha / r) * (b @ a)
        assert not torch.allclose(expected, w)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 2
