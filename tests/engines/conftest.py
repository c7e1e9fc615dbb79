"""Engine fixtures: a transformers engine on the tiny model, a soft prompt D (and a representation
holding it), and a real LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir):
    from domino_ray.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=512)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def soft_prefix(hf_engine):
    """A (4, H) soft prompt on the scale of real token embeddings (rows of the embedding table,
    perturbed), so generations from it look like generations from text."""
    import torch

    table = hf_engine.model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(0)
    rows = table[torch.tensor([300, 301, 302, 303])]
    return (rows + 0.1 * table.std() * torch.randn(rows.shape, generator=gen)).float()


@pytest.fixture
def backbone(tiny_model_dir):
    return {"model": str(tiny_model_dir), "device": "cpu"}


@pytest.fixture
def representation(tmp_path, hf_engine, soft_prefix):
    """A real representation written by domino_ray.representation, learned 'on' the tiny backbone."""
    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import save_representation

    run = tmp_path / "run"
    save_representation(str(run), soft_prefix, {"backbone": hf_engine.model_id, "prefix": "def",
                                                "backbone_signature": backbone_signature(hf_engine.model_config)})
    return run


@pytest.fixture(scope="session")
def lora_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A peft LoRA adapter on the tiny model with random non-zero lora_B (peft initialises B to zero,
    which would leave generations unchanged), in the layout finetune's export writes: the default
    target modules (config.LoraConfig), the peft files and the tokenizer beside them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domino_ray.config import LoraConfig as FinetuneLora

    out = tmp_path_factory.mktemp("lora-adapter")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=FinetuneLora().target_modules))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out
