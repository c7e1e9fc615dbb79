"""The learned domain representation on storage: `<run>/representation/` save, load, check, export.

Files (DESIGN.md sections 2 and 5):
- `domain.safetensors`: tensor `domain`, D of shape (P, H), float32.
- `representation.json`: backbone id and signature, H, P, Q, dtype, the input layout, init, the text
  prefix used after the soft tokens, the reference-set hash, training metrics, the sha256 of D's bytes,
  created_at and format_version. Written last, so its presence means the tensors are complete.
- `private.safetensors` (optional): the per-sample tables S_i, only useful to resume or inspect training.

Compatibility rule (which side wins): H and the architecture part of the backbone signature must
match the engine's model, or loading fails naming both. The weights part (a hash of a few weight
slices, `backbone.backbone_signature`) tells a base model from its instruct sibling: other weights
fail too, unless the user deliberately allows it (`engine.allow_other_weights`), which warns. A
different model *id* with the same signature only warns, because the same weights live under
different paths on different machines.

BOS option (`learn.bos`): `bos_token_id` in representation.json; generation then starts every request
with `[embed(BOS) ; D]` (the engine's own embedding of BOS), and the PEFT export bakes that embedding
in as an extra first virtual token.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from domino_ray.layout import (REPRESENTATION_DIR, REPRESENTATION_DOMAIN, REPRESENTATION_META, REPRESENTATION_PRIVATE,
                               RunLayout)
from domino_ray.storage import Storage, join_uri

__all__ = [
    "FORMAT_VERSION",
    "LAYOUT",
    "RepresentationError",
    "RepresentationMismatch",
    "Representation",
    "save_representation",
    "load_representation",
    "load_private",
    "check_compatible",
    "signature_conflict",
    "export_peft_adapter",
    "tensor_sha256",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAYOUT = "[D ; S_i ; tokens(prefix) ; tokens(X)]"  # training input; generation uses [D ; tokens(prefix)]
DIR_NAME, DOMAIN_FILE, META_FILE, PRIVATE_FILE = (  # named in layout.py; a representation folder holds these
    REPRESENTATION_DIR, REPRESENTATION_DOMAIN, REPRESENTATION_META, REPRESENTATION_PRIVATE)
DOMAIN_KEY = "domain"
# PEFT's prompt-learning checkpoints hold one tensor under this key (peft/tuners/tuners_utils.py,
# BasePromptEncoder._get_adapter_state_dict / _load_adapter_state_dict).
PEFT_PROMPT_KEY = "prompt_embeddings"


class RepresentationError(ValueError):
    """A representation that is missing, corrupt or inconsistent; the message names the file."""


class RepresentationMismatch(ValueError):
    """A representation learned on a different backbone than the engine's model."""


@dataclass
class Representation:
    """D (float32, (P, H)) with its metadata; `uri` is the representation folder it came from."""

    domain: Any  # torch.Tensor (P, H)
    meta: dict[str, Any]
    sha256: str
    uri: str = ""

    @property
    def hidden_size(self) -> int:
        return int(self.domain.shape[1])

    @property
    def num_domain_tokens(self) -> int:
        return int(self.domain.shape[0])

    @property
    def prefix(self) -> str:
        return self.meta.get("prefix") or ""

    @property
    def backbone(self) -> str:
        return str(self.meta.get("backbone", ""))

    @property
    def bos_token_id(self) -> Optional[int]:
        """The BOS placed before D (`learn.bos`), or None."""
        value = self.meta.get("bos_token_id")
        return None if value is None else int(value)


def tensor_sha256(tensor) -> str:
    """sha256 of a tensor's float32 little-endian bytes (independent of the file's header)."""
    import numpy as np

    arr = tensor.detach().to("cpu").float().contiguous().numpy().astype("<f4", copy=False)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_fp32_matrix(domain, what: str):
    import torch

    if not isinstance(domain, torch.Tensor) or domain.dim() != 2:
        shape = tuple(domain.shape) if hasattr(domain, "shape") else type(domain).__name__
        raise RepresentationError(f"{what} must be a 2-D tensor (P, H), got {shape}")
    return domain.detach().to("cpu", torch.float32).contiguous()


# ------------------------------------------------------------------------------------------- save
def save_representation(run_root_uri: str, domain, meta: dict[str, Any], storage: Optional[Storage] = None,
                        private: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write D (and optional S_i tables) under <run>/representation/; returns the written metadata.

    `meta` must hold "backbone" and "backbone_signature"; it may hold num_sample_tokens, init, prefix,
    reference_sha256, metrics and anything else (kept). H, P, dtype, layout and sha256 come from D.
    """
    from safetensors.torch import save

    storage = storage or Storage()
    missing = [k for k in ("backbone", "backbone_signature") if not meta.get(k)]
    if missing:
        raise RepresentationError(f"save_representation: meta lacks {missing}; they are needed to check engines later")
    domain = _as_fp32_matrix(domain, "domain")
    num_tokens, hidden = domain.shape
    for key, actual in (("hidden_size", hidden), ("num_domain_tokens", num_tokens)):
        if meta.get(key) is not None and int(meta[key]) != actual:
            raise RepresentationError(f"save_representation: meta {key}={meta[key]} but D has shape {tuple(domain.shape)}")
    full = {
        "backbone": str(meta["backbone"]),
        "backbone_signature": meta["backbone_signature"],
        "hidden_size": int(hidden),
        "num_domain_tokens": int(num_tokens),
        "num_sample_tokens": meta.get("num_sample_tokens"),
        "dtype": "float32",
        "layout": LAYOUT,
        "init": meta.get("init"),
        "prefix": meta.get("prefix") or "",
        "reference_sha256": meta.get("reference_sha256"),
        "metrics": meta.get("metrics") or {},
        "sha256": tensor_sha256(domain),
        "created_at": _now(),
        "format_version": FORMAT_VERSION,
    }
    full.update({k: v for k, v in meta.items() if k not in full})  # caller extras (config, counts)
    layout = RunLayout(run_root_uri)
    rep_dir = layout.representation
    storage.write_bytes(layout.representation_domain, save({DOMAIN_KEY: domain}, metadata={"format": "pt"}))
    if private:
        tables = {name: _as_fp32_matrix(t, f"private[{name!r}]") for name, t in private.items()}
        storage.write_bytes(layout.representation_private, save(tables, metadata={"format": "pt"}))
        full["private_tensors"] = {name: list(t.shape) for name, t in tables.items()}
    storage.write_json(layout.representation_meta, full)  # last: its presence marks a complete write
    log.info("representation: D %s saved to %s (sha256 %s)", tuple(domain.shape), rep_dir, full["sha256"][:12])
    return full


# ------------------------------------------------------------------------------------------- load
def _representation_dir(uri: str, storage: Storage) -> str:
    """The folder holding representation.json: `uri` itself or `uri`/representation."""
    for candidate in (uri, RunLayout(uri).representation):
        if storage.exists(join_uri(candidate, META_FILE)):
            return candidate
    raise RepresentationError(
        f"no {META_FILE} in {uri} or {RunLayout(uri).representation}; give a run root or its representation "
        f"folder, and run `domino learn` first")


def _load_tensors(uri: str, storage: Storage) -> dict[str, Any]:
    from safetensors.torch import load

    blob = storage.read_bytes(uri)
    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated/garbled header
        raise RepresentationError(f"{uri}: corrupt safetensors file ({e}); re-run `domino learn`") from e


def load_representation(uri: str, storage: Optional[Storage] = None) -> Representation:
    """Load D from a run root or its representation folder (local or s3), checking shape and sha256."""
    storage = storage or Storage()
    rep_dir = _representation_dir(str(uri), storage)
    meta_uri, domain_uri = join_uri(rep_dir, META_FILE), join_uri(rep_dir, DOMAIN_FILE)
    try:
        meta = storage.read_json(meta_uri)
    except ValueError as e:
        raise RepresentationError(f"{meta_uri}: not valid JSON ({e})") from e
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RepresentationError(f"{meta_uri}: format_version {version!r} is newer than this domino-ray reads "
                                  f"({FORMAT_VERSION}); upgrade domino-ray")
    tensors = _load_tensors(domain_uri, storage)
    if DOMAIN_KEY not in tensors:
        raise RepresentationError(f"{domain_uri}: no tensor {DOMAIN_KEY!r} (has {sorted(tensors)})")
    domain = _as_fp32_matrix(tensors[DOMAIN_KEY], f"{domain_uri}: tensor {DOMAIN_KEY!r}")
    expected = (meta.get("num_domain_tokens"), meta.get("hidden_size"))
    if tuple(domain.shape) != expected:
        raise RepresentationError(f"{domain_uri}: D has shape {tuple(domain.shape)} but {META_FILE} says "
                                  f"(num_domain_tokens, hidden_size) = {expected}")
    digest = tensor_sha256(domain)
    if digest != meta.get("sha256"):
        raise RepresentationError(f"{domain_uri}: sha256 {digest[:12]}... does not match {META_FILE} "
                                  f"({str(meta.get('sha256'))[:12]}...): the file is corrupt or was replaced")
    return Representation(domain=domain, meta=meta, sha256=digest, uri=rep_dir)


def load_private(uri: str, storage: Optional[Storage] = None) -> dict[str, Any]:
    """The per-sample S_i tables saved with a representation ({} when none were saved)."""
    storage = storage or Storage()
    rep_dir = _representation_dir(str(uri), storage)
    private_uri = join_uri(rep_dir, PRIVATE_FILE)
    return _load_tensors(private_uri, storage) if storage.exists(private_uri) else {}


# ------------------------------------------------------------------------------------------ check
def _config_hidden_size(model_config) -> Optional[int]:
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if cfg.get("hidden_size") is None and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal configs keep the LM's H in text_config
    return cfg.get("hidden_size")


def signature_conflict(saved: str, current: str) -> Optional[str]:
    """How two backbone signatures (`ARCH` or `ARCH-WEIGHTS`) differ: "architecture", "weights" (same
    architecture, other weights: both sides must have a weights part) or None (compatible)."""
    saved_arch, _, saved_weights = str(saved).partition("-")
    arch, _, weights = str(current).partition("-")
    if arch != saved_arch:
        return "architecture"
    if weights and saved_weights and weights != saved_weights:
        return "weights"
    return None


def check_compatible(rep: Representation, model_config, model_id: str, signature: Optional[str] = None,
                     allow_other_weights: bool = False) -> None:
    """Raise RepresentationMismatch unless D fits the model of `model_config` (see module docstring).

    `signature` is the engine's `backbone_signature(model_config, weights=model_id)` when it has it.
    """
    from domino_ray.backbone import backbone_signature

    where = rep.uri or "representation"
    learned_on = rep.backbone or "?"
    hidden = _config_hidden_size(model_config)
    if hidden != rep.hidden_size:
        raise RepresentationMismatch(
            f"{where}: D has hidden size H={rep.hidden_size} (learned on backbone {learned_on!r}) but the engine "
            f"model {model_id!r} has H={hidden}; use the backbone D was learned on, or re-run `domino learn` "
            f"with backbone.model: {model_id}")
    signature = signature or backbone_signature(model_config, weights=model_id)
    conflict = signature_conflict(str(rep.meta.get("backbone_signature") or ""), str(signature))
    saved_weights, weights = (str(x).partition("-")[2] for x in (rep.meta.get("backbone_signature"), signature))
    if conflict == "architecture":
        raise RepresentationMismatch(
            f"{where}: D was learned on backbone {learned_on!r} (signature {rep.meta.get('backbone_signature')}) "
            f"but the engine model {model_id!r} has signature {signature}: same H={hidden}, different architecture "
            f"or vocabulary; use the same backbone or re-run `domino learn`")
    if conflict == "weights":
        message = (f"{where}: D was learned on backbone {learned_on!r} (weights {saved_weights}) but the engine model "
                   f"{model_id!r} has the same architecture with other weights ({weights}), e.g. a base model and "
                   f"its instruct sibling")
        if not allow_other_weights:
            raise RepresentationMismatch(f"{message}; use the model D was learned on, re-run `domino learn` on this "
                                         f"one, or set engine.allow_other_weights: true to use it anyway")
        log.warning("%s; used anyway (engine.allow_other_weights is true)", message)
        return
    if str(model_id) != learned_on:
        log.warning("representation %s was learned on %r and is used with %r: same architecture signature %s, "
                    "so this is taken as the same model under another path", where, learned_on, model_id, signature)


# ----------------------------------------------------------------------------------------- export
def export_peft_adapter(rep: Representation, out_dir: str | Path, base_model: str) -> Path:
    """Write D as a PEFT prompt-tuning adapter that `PeftModel.from_pretrained(base, out_dir)` loads.

    The adapter holds D only: a text `prefix` (rep.prefix) has no place in PEFT's format, so callers
    must prepend it to their inputs themselves (a warning says so). With the BOS option the adapter's
    prompt is `[embed(BOS) ; D]` (P + 1 virtual tokens, BOS embedded by the base model's own module),
    and inputs must then be tokenized without a BOS of their own.
    """
    import torch
    from peft import PromptTuningConfig, TaskType
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt = rep.domain
    if rep.bos_token_id is not None:
        from transformers import AutoConfig

        from domino_ray.engines.vllm import _load_input_embeddings

        embed = _load_input_embeddings(str(base_model), AutoConfig.from_pretrained(str(base_model)), False)
        with torch.no_grad():
            bos = embed(torch.tensor([rep.bos_token_id])).float()
        prompt = torch.cat([bos, rep.domain])
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=int(prompt.shape[0]),
        token_dim=rep.hidden_size,
        num_transformer_submodules=1,  # decoder-only: one prompt table
        base_model_name_or_path=str(base_model),
        inference_mode=True,
    )
    config.save_pretrained(str(out))
    save_file({PEFT_PROMPT_KEY: prompt.contiguous()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    if rep.prefix:
        log.warning("PEFT adapter in %s holds D only; prepend the text prefix %r to inputs yourself", out, rep.prefix)
    return out
