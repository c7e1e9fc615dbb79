"""The DOMINO objective: sufficiency L1, the B x B matrix M, the contrastive minimality L2, their sum.

DESIGN.md section 1, with a frozen causal LM f, domain tokens D (P, H) and sample tokens S_i (Q, H):

    nll(X | ctx)  mean token NLL of X under f given the soft context ctx (pad targets never count)
    L1            mean_i nll(X_i | D)
    M[i, j]       nll(X_j | D, S_i)                                   (B, B), row = sample tokens, col = text
    L2 paper      mean_i [ M[i,i]/tau + logsumexp_{j != i}(-M[i,j]/tau) ]
    L2 infonce    mean_i [ M[i,i]/tau + logsumexp_j(-M[i,j]/tau) ]   (cross-entropy of -M/tau rows, target i)
    L2 released   mean_i M[i,i]/tau + log mean_{i != j} exp(-M[i,j]/tau)   (pooled over the batch)
    L             L1 + lambda * L2           (lambda = 0: plain prompt tuning, M is never computed)

tau = 1 gives the formulas of DESIGN section 1 exactly; the released variant divides by tau too so all
three variants read the temperature the same way.

Input layout (generation must use the same): `[D ; (S_i) ; tokens(prefix) ; tokens(X)]`, where the
prefix is `references.prefix` (fixed text, context only, never a target); with `learn.bos` the
tokenizer's BOS comes first (`lead_ids`: `[BOS ; D ; ...]`). Every token of X is a target, the first
one included (it is predicted from the last context position). Token embeddings always come from the
model's input-embedding module and logits from the model's own forward, so whatever a family does
there (Gemma's sqrt(H) embedding scale, Cohere's logit_scale, Granite's logits_scaling, Gemma-2's
final soft-cap) is in both implementations.

Normalisation: `sample` divides each sample's summed NLL by its own token count; `token` divides by
the mean token count of the batch, so that L1 = (all token NLLs) / (all tokens) and M stays in the
same units.

Two implementations with the same results (tests compare them to ~1e-5 in fp32):
- `domino_loss` (used for training on attention-only models): one batched forward of the B context
  rows `[D ; S_i ; prefix]`
  (+ one `[D ; prefix]` row when the prefix is not empty; when it is, the D-only context is the
  first P positions of any row, as attention is causal) with the KV cache on. Then only the text
  tokens run, against the cached keys/values: B rows for L1, B^2 rows for M (row i's cache
  broadcast to its B texts). Gradients flow back through the cache into D and S_i. The diagonal of
  M gives the positive terms. Cost: B (+1) context rows + B^2 + B text rows. The caches are built
  without the model config, so a sliding-window layer never crops the context (its window is still
  applied by the model's mask). Models with recurrent or linear-attention layers (Qwen3-Next, SSMs)
  cannot share a cache across rows: `domino_loss` raises UnsupportedCacheError for them and
  `loss_function(model)` returns the exact straightforward formulation instead, with a warning.
- `domino_loss_straightforward` (reference and benchmark baseline): the released code's way, full
  sequences `[D;X]`, `[D;S_i;X_i]` and per i `[D;S_i;X_j]` for all j: B + 2 forward passes,
  B^2 + 2B full rows, the diagonal computed twice.

Pure torch: no Ray import (STYLE.md 1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from domino_ray.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

__all__ = [
    "ObjectiveSpec",
    "TextBatch",
    "LossOutput",
    "pad_texts",
    "make_batches",
    "batch_sizes",
    "init_soft_tokens",
    "UnsupportedCacheError",
    "fast_path_problem",
    "loss_function",
    "resolve_chunk_rows",
    "contrastive_loss",
    "l2_paper",
    "l2_infonce",
    "l2_released",
    "normalizers",
    "domino_loss",
    "domino_loss_straightforward",
]

Contrastive = Literal["paper", "infonce", "released"]
Normalize = Literal["sample", "token"]


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ObjectiveSpec:
    """The loss settings of `learn` (LearnConfig fields of the same names)."""

    lambda_: float = 1.0
    tau: float = 1.0
    contrastive: Contrastive = "paper"
    normalize: Normalize = "sample"
    chunk_rows: Union[int, str] = 0  # rows of M per text forward; 0 = all B^2 at once; "auto" = from memory
    memory_budget_gb: Optional[float] = None  # chunk_rows auto: bytes for M's activations (None = measured free)

    @classmethod
    def from_config(cls, learn_cfg: Any) -> "ObjectiveSpec":
        return cls(lambda_=learn_cfg.lambda_, tau=learn_cfg.tau, contrastive=learn_cfg.contrastive,
                   normalize=learn_cfg.normalize, chunk_rows=learn_cfg.chunk_rows,
                   memory_budget_gb=getattr(learn_cfg, "memory_budget_gb", None))


@dataclass
class TextBatch:
    """B reference texts, right-padded (right padding needs no attention mask under a causal LM:
    real positions never see the pads that follow them)."""

    tokens: torch.Tensor   # (B, L) long, pad_id after each text
    targets: torch.Tensor  # (B, L) long, tokens with pads set to IGNORE_INDEX

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: Any) -> "TextBatch":
        return TextBatch(self.tokens.to(device), self.targets.to(device))


def pad_texts(token_ids: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> TextBatch:
    """Right-pad token lists into a TextBatch; each text needs at least one token (its EOS)."""
    if not token_ids:
        raise ValueError("pad_texts: empty batch")
    empty = [i for i, ids in enumerate(token_ids) if len(ids) == 0]
    if empty:
        raise ValueError(f"pad_texts: texts {empty} have no tokens; every reference ends with EOS at least")
    length = max(len(ids) for ids in token_ids)
    tokens = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    targets = torch.full((len(token_ids), length), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        tokens[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        targets[row, : len(ids)] = tokens[row, : len(ids)]
    return TextBatch(tokens.to(device), targets.to(device))


def batch_sizes(n: int, batch_size: int, num_batches: Optional[int] = None) -> list[int]:
    """Sizes of the batches `make_batches` cuts `n` samples into (each >= 2, differing by <= 1)."""
    if batch_size < 2:
        raise ValueError(f"learn.batch_size is {batch_size}; it must be >= 2 (the contrastive loss needs a negative)")
    if n < 2:
        raise ValueError(f"{n} reference sample(s) here; a batch needs at least 2 (add references or use fewer workers)")
    if num_batches is None:
        num_batches = min(math.ceil(n / batch_size), n // 2)
    if not 1 <= num_batches <= n // 2:
        raise ValueError(f"cannot split {n} samples into {num_batches} batches of >= 2")
    bounds = [round(b * n / num_batches) for b in range(num_batches + 1)]
    return [bounds[b + 1] - bounds[b] for b in range(num_batches)]


def make_batches(indices: Sequence[int], batch_size: int, seed: int,
                 num_batches: Optional[int] = None, sizes: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Shuffle `indices` (seeded) and split them into batches of at least 2 (DESIGN section 1).

    By default no sample is dropped: the remainder is spread over the batches, so a batch may hold up
    to a few more than `batch_size`. `num_batches` fixes the count. `sizes` fixes every batch's size
    (distributed workers pass the sizes of the smallest shard, so that all workers run the same number
    of steps with equal batch sizes): the first sum(sizes) samples of the shuffled order are used and
    the rest sit this epoch out (a new shuffle every epoch rotates them).
    """
    n = len(indices)
    if sizes is None:
        sizes = batch_sizes(n, batch_size, num_batches)
    sizes = [int(k) for k in sizes]
    if min(sizes) < 2 or sum(sizes) > n:
        raise ValueError(f"cannot cut {n} samples into batches of sizes {sizes} (each >= 2)")
    gen = torch.Generator().manual_seed(seed)
    order = [indices[k] for k in torch.randperm(n, generator=gen).tolist()]
    out, start = [], 0
    for size in sizes:
        out.append(order[start: start + size])
        start += size
    return out


def init_soft_tokens(embedding: Any, shape: Sequence[int], method: str, seed: int,
                     num_tokens: Optional[int] = None) -> torch.Tensor:
    """Initial soft tokens of shape `(*shape, H)`, fp32 on CPU.

    `embedding` is the model's input-embedding module (`model.get_input_embeddings()`: some models
    scale inside it, Gemma by sqrt(H), and soft tokens must start on the scale the model sees), or a
    raw (V, H) weight table. `num_tokens` limits the draw to the real token ids `[0, num_tokens)`
    (`len(tokenizer)`): embedding tables are often padded with untrained rows (Qwen2.5: 152,064 rows
    for 151,665 tokens).

    `vocab`: embeddings of random vocabulary tokens (on the embedding manifold, DESIGN section 1).
    `normal`: N(0, std of the real token embeddings) - not N(0, 1), which is far off the scale of real
    token embeddings (a pitfall of the released code).
    """
    if isinstance(embedding, torch.Tensor):
        weight = embedding.detach()
        rows, hidden = weight.shape

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            return weight[ids.to(weight.device)].float().cpu()
    else:
        weight = embedding.weight
        rows, hidden = weight.shape

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return embedding(ids.to(weight.device)).float().cpu()
    vocab = rows if num_tokens is None else min(int(num_tokens), rows)
    if vocab < 1:
        raise ValueError(f"init_soft_tokens: no token ids to draw from (num_tokens={num_tokens}, table rows={rows})")
    count = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    if method == "vocab":
        ids = torch.randint(0, vocab, (count,), generator=gen)
        out = lookup(ids).clone()
    elif method == "normal":
        sample = torch.randperm(vocab, generator=gen)[: min(vocab, 65536)]
        std = lookup(sample).std()
        out = torch.randn(count, hidden, generator=gen) * std
    else:
        raise ValueError(f"learn.init is {method!r}; use 'vocab' or 'normal'")
    return out.view(*shape, hidden)


# ----------------------------------------------------------------------------- contrastive L2
def _check_square(M: torch.Tensor) -> int:
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square (B, B) matrix, got shape {tuple(M.shape)}")
    if M.shape[0] < 2:
        raise ValueError("M is 1 x 1: a batch of one sample has no negative and the contrastive "
                         "denominator is empty; batches must hold >= 2 samples (make_batches)")
    return M.shape[0]


def l2_paper(M: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """mean_i [ M[i,i]/tau + logsumexp_{j != i}(-M[i,j]/tau) ]  (the paper's form, DESIGN section 1)."""
    B = _check_square(M)
    eye = torch.eye(B, dtype=torch.bool, device=M.device)
    negatives = (-M / tau).masked_fill(eye, float("-inf"))  # (B, B), diagonal excluded
    return (M.diagonal() / tau + torch.logsumexp(negatives, dim=1)).mean()


def l2_infonce(M: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Softmax cross-entropy of the rows -M[i, :]/tau with target i (denominator includes j = i)."""
    B = _check_square(M)
    return F.cross_entropy(-M / tau, torch.arange(B, device=M.device))


def l2_released(M: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """mean_i M[i,i]/tau + log mean_{i != j} exp(-M[i,j]/tau)  (the authors' released variant)."""
    B = _check_square(M)
    off = ~torch.eye(B, dtype=torch.bool, device=M.device)
    pooled = torch.logsumexp(-M[off] / tau, dim=0) - math.log(B * (B - 1))  # log of the mean
    return M.diagonal().mean() / tau + pooled


_L2 = {"paper": l2_paper, "infonce": l2_infonce, "released": l2_released}


def contrastive_loss(M: torch.Tensor, variant: str = "paper", tau: float = 1.0) -> torch.Tensor:
    if variant not in _L2:
        raise ValueError(f"learn.contrastive is {variant!r}; use one of {sorted(_L2)}")
    return _L2[variant](M, tau)


# ------------------------------------------------------------------------------------- output
@dataclass
class LossOutput:
    loss: torch.Tensor                  # scalar, with grad
    l1: torch.Tensor                    # scalar, detached
    l2: Optional[torch.Tensor] = None   # scalar, detached; None when lambda = 0
    M: Optional[torch.Tensor] = None    # (B, B), detached; None when lambda = 0
    chunk_rows: Optional[int] = None    # rows of M per forward the fast path used (0 = all at once)

    def metrics(self) -> dict[str, float]:
        """Floats for logging; m_diag / m_offdiag are the mean NLL of own / other texts under S_i."""
        out = {"loss": float(self.loss.detach()), "l1": float(self.l1)}
        if self.M is not None:
            B = self.M.shape[0]
            off = ~torch.eye(B, dtype=torch.bool, device=self.M.device)
            out.update(l2=float(self.l2), m_diag=float(self.M.diagonal().mean()), m_offdiag=float(self.M[off].mean()))
        else:
            out.update(l2=float("nan"), m_diag=float("nan"), m_offdiag=float("nan"))
        return out


def _combine(l1: torch.Tensor, M: Optional[torch.Tensor], spec: ObjectiveSpec) -> LossOutput:
    if M is None:
        return LossOutput(loss=l1, l1=l1.detach())
    l2 = contrastive_loss(M, spec.contrastive, spec.tau)
    return LossOutput(loss=l1 + spec.lambda_ * l2, l1=l1.detach(), l2=l2.detach(), M=M.detach())


def normalizers(texts: TextBatch, normalize: str) -> torch.Tensor:
    """(B,) divisor of each text's summed NLL: its token count (`sample`) or the batch mean (`token`)."""
    counts = (texts.targets != IGNORE_INDEX).sum(dim=1).float()  # (B,)
    if normalize == "sample":
        return counts
    if normalize == "token":
        return counts.mean().expand_as(counts)
    raise ValueError(f"learn.normalize is {normalize!r}; use 'sample' or 'token'")


def _check_inputs(D: torch.Tensor, S: Optional[torch.Tensor], texts: TextBatch, spec: ObjectiveSpec) -> None:
    if texts.size < 2:
        raise ValueError(f"batch of {texts.size} sample: DOMINO batches need >= 2 samples (the contrastive "
                         "denominator is empty otherwise); build them with objective.make_batches")
    if D.dim() != 2:
        raise ValueError(f"D must be (P, H), got shape {tuple(D.shape)}")
    if spec.lambda_ > 0:
        if S is None or S.dim() != 3 or S.shape[0] != texts.size:
            got = None if S is None else tuple(S.shape)
            raise ValueError(f"S must be (B={texts.size}, Q, H) when lambda > 0, got {got}")


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(R, T, V) logits, (R, T) targets -> (R,) summed NLL over the non-ignored targets (fp32)."""
    tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return tok.view(targets.shape).sum(dim=1)


def _embed_ids(embed, ids: Sequence[int], device: Any, dtype: Any) -> torch.Tensor:
    """(len, H) embeddings of token ids through the model's input-embedding module (its scaling included)."""
    return embed(torch.as_tensor(list(ids), dtype=torch.long, device=device)).to(dtype)


# ------------------------------------------------------------ which models the fast path serves
class UnsupportedCacheError(ValueError):
    """The model's cache cannot be computed once and shared across rows (recurrent or linear-attention
    state, a cache the model crops); `loss_function` falls back to the exact full-sequence formulation."""


# Attention layers whose keys/values are per position, so a context's cache can be copied to many rows.
_SHAREABLE_LAYERS = {"full_attention", "sliding_attention"}
# Architectures with recurrent state and no `layer_types` saying so.
_STATEFUL_MODELS = {"mamba", "mamba2", "rwkv", "jamba", "zamba", "zamba2", "falcon_h1", "falcon_mamba", "bamba",
                    "granitemoehybrid", "lfm2", "nemotron_h", "xlstm", "recurrent_gemma", "minimax"}


def _text_config(model) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def fast_path_problem(model) -> Optional[str]:
    """Why `domino_loss` cannot run on `model` (None when it can)."""
    cfg = _text_config(model)
    kind = getattr(cfg, "model_type", type(model).__name__)
    other = sorted(set(getattr(cfg, "layer_types", None) or ()) - _SHAREABLE_LAYERS)
    if other:
        return (f"{kind} has {other} layers, whose cache (recurrent / linear-attention state) cannot be computed "
                f"once and shared across the rows of M")
    if kind in _STATEFUL_MODELS:
        return f"{kind} keeps a recurrent state, which cannot be shared across the rows of M"
    return None


def loss_function(model):
    """`domino_loss`, or the exact `domino_loss_straightforward` (with a warning) when the model's cache
    cannot be shared (`fast_path_problem`). `learn` trains with what this returns."""
    problem = fast_path_problem(model)
    if problem is None:
        return domino_loss
    log.warning("objective: %s; using the exact full-sequence formulation instead (domino_loss_straightforward: "
                "B + 2 forwards of full rows, slower and more memory)", problem)
    return domino_loss_straightforward


def _shared_kv(cache, rows: int, length: int, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of the context forward, checked to hold every context position."""
    kv = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[0] != rows or keys.shape[2] != length:
            got = None if not isinstance(keys, torch.Tensor) else tuple(keys.shape)
            raise UnsupportedCacheError(
                f"{_text_config(model).model_type}: cache layer {i} ({type(layer).__name__}) holds keys of shape "
                f"{got}, not ({rows}, heads, {length}, head_dim); the fast path needs every context position "
                f"(use objective.loss_function, which falls back to the exact full-sequence formulation)")
        kv.append((keys, values))
    return kv


# ---------------------------------------------------------------------- efficient (KV cache)
def _context_rows(D: torch.Tensor, S: Optional[torch.Tensor], prefix_emb: torch.Tensor, with_m: bool):
    """Context embeddings of one step and where the two kinds of context sit in them.

    Returns (rows (R, Lc, H), l1_row, l1_len, m_len). Rows 0..B-1 are `[D ; S_i ; prefix]` when M is
    needed; the L1 context `[D ; prefix]` is the first P positions of row 0 when the prefix is
    empty (causal attention: those positions never see S_0), else one extra row, zero-padded at the
    end to the common length (pads after a causal prefix change nothing before them).
    """
    P, H = D.shape
    Lp = prefix_emb.shape[0]
    d_prefix = torch.cat([D, prefix_emb], dim=0)  # (P + Lp, H)
    if not with_m:
        return d_prefix.unsqueeze(0), 0, P + Lp, 0
    B, Q, _ = S.shape
    rows = torch.cat([D.expand(B, P, H), S, prefix_emb.expand(B, Lp, H)], dim=1)  # (B, P+Q+Lp, H)
    if Lp == 0:
        return rows, 0, P, P + Q
    extra = torch.cat([d_prefix, d_prefix.new_zeros(Q, H)], dim=0).unsqueeze(0)  # (1, P+Q+Lp, H)
    return torch.cat([rows, extra], dim=0), B, P + Lp, P + Q + Lp


def _continue_rows(model, kv, ctx_index: torch.Tensor, ctx_len: int, text_emb: torch.Tensor,
                   txt_index: torch.Tensor, text_targets: torch.Tensor) -> torch.Tensor:
    """Run text rows against cached contexts: row r = text txt_index[r] after context ctx_index[r].

    kv: per layer (keys, values), each (R_ctx, heads, Lc, head_dim). Returns (R,) summed NLL. The cache
    is built without the model config, so every layer is a full one: a sliding-window layer's cache is
    never cropped, and the model's own mask still applies the window (exact against full sequences).
    Logits come from the model's own forward (Cohere's logit_scale, Granite's logits_scaling,
    Gemma-2's final soft-cap included).
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[ctx_index, :, :ctx_len], v[ctx_index, :, :ctx_len]) for k, v in kv])
    # position ids default to ctx_len + arange: the same positions as the full-sequence layout
    logits = model(inputs_embeds=text_emb[txt_index], past_key_values=cache, use_cache=True).logits
    return _token_nll(logits, text_targets[txt_index])


_ROW_COST: dict[tuple, float] = {}  # (model id, dtype, autocast) -> measured saved-activation bytes per text token


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while `fn` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _memory_budget(spec: ObjectiveSpec, device: torch.device) -> float:
    if spec.memory_budget_gb is not None:
        return spec.memory_budget_gb * 1024**3
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free  # the backward of a chunk needs about as much again
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0.4 * available


def resolve_chunk_rows(model, kv, m_len: int, text_emb: torch.Tensor, text_targets: torch.Tensor, B: int,
                       spec: ObjectiveSpec) -> int:
    """Rows of M per chunk: `spec.chunk_rows` itself, or for "auto" as many rows as the memory budget
    holds (0 = all B^2 rows at once, no checkpointing).

    The per-row cost is measured once per model: the bytes autograd saves for one text row (a short
    probe against this step's cache, its logits and log-softmax included), scaled to the batch's text
    length, plus the row's copy of the context cache (indexed and then extended by the text).
    """
    if spec.chunk_rows != "auto":
        if not isinstance(spec.chunk_rows, int) or spec.chunk_rows < 0:
            raise ValueError(f"learn.chunk_rows is {spec.chunk_rows!r}; use an integer >= 0 or 'auto'")
        return spec.chunk_rows
    if not torch.is_grad_enabled():
        return 0
    device = text_emb.device
    key = (id(model), str(text_emb.dtype), torch.is_autocast_enabled(device.type))
    if key not in _ROW_COST:
        probe = min(text_emb.shape[1], 32)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        cost = _saved_bytes(lambda: _continue_rows(model, kv, zero, m_len, text_emb[:, :probe], zero,
                                                   text_targets[:, :probe]).sum())
        _ROW_COST[key] = cost / probe
    kv_row = sum(2 * k[0].numel() * k.element_size() for k, _ in kv) * 2  # keys + values, copied twice
    row_cost = _ROW_COST[key] * text_emb.shape[1] + kv_row
    rows = int(_memory_budget(spec, device) // max(row_cost, 1.0))
    chosen = 0 if rows >= B * B else max(1, rows)
    log.debug("objective: chunk_rows auto = %d (%.1f MB per row of M, B^2 = %d)", chosen, row_cost / 1e6, B * B)
    return chosen


def _m_text_sums(model, kv, m_len: int, text_emb, text_targets, B: int, chunk_rows: int) -> torch.Tensor:
    """(B, B) summed NLL of texts j after contexts [D;S_i;prefix], without their first token.

    With chunk_rows > 0 the B^2 rows run in chunks under activation checkpointing: memory holds one
    chunk's activations, at the price of re-running each chunk's text forward in the backward.
    """
    rows = torch.arange(B * B, device=text_emb.device)
    ctx_index, txt_index = rows // B, rows % B  # row r = (i, j), i-major
    size = chunk_rows if chunk_rows > 0 else B * B
    if size >= B * B:
        return _continue_rows(model, kv, ctx_index, m_len, text_emb, txt_index, text_targets).view(B, B)

    flat = [t for pair in kv for t in pair]

    def run(ci, ti, *flat_kv):
        pairs = list(zip(flat_kv[0::2], flat_kv[1::2]))
        return _continue_rows(model, pairs, ci, m_len, text_emb, ti, text_targets)

    sums = []
    for start in range(0, B * B, size):
        ci, ti = ctx_index[start: start + size], txt_index[start: start + size]
        if torch.is_grad_enabled():
            sums.append(torch.utils.checkpoint.checkpoint(run, ci, ti, *flat, use_reentrant=False,
                                                          preserve_rng_state=False))
        else:
            sums.append(run(ci, ti, *flat))
    return torch.cat(sums).view(B, B)


def domino_loss(model, D: torch.Tensor, S: Optional[torch.Tensor], texts: TextBatch,
                prefix_ids: Sequence[int] = (), spec: ObjectiveSpec = ObjectiveSpec(),
                lead_ids: Sequence[int] = ()) -> LossOutput:
    """L = L1 + lambda * L2 with shared soft prefixes computed once per step (module docstring).

    model: frozen HF causal LM; D: (P, H) fp32; S: (B, Q, H) fp32, the batch's sample tokens (may be
    None when lambda = 0); texts: B >= 2 padded texts; prefix_ids: tokens of references.prefix;
    lead_ids: tokens placed before the soft tokens (the BOS option: `[BOS ; D ; S_i ; prefix ; X]`).
    Raises UnsupportedCacheError for models whose cache cannot be shared (see `loss_function`).
    """
    _check_inputs(D, S, texts, spec)
    problem = fast_path_problem(model)
    if problem is not None:
        raise UnsupportedCacheError(
            f"{problem}: objective.domino_loss (shared soft-prefix KV cache) cannot run on it. Use "
            f"objective.loss_function(model), which falls back to the exact domino_loss_straightforward "
            f"(learn does so itself)")
    from transformers import DynamicCache

    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    device = embed.weight.device
    texts = texts.to(device)
    B, L = texts.tokens.shape
    with_m = spec.lambda_ > 0

    soft_d = torch.cat([_embed_ids(embed, lead_ids, device, dtype), D.to(dtype)], dim=0)  # ([BOS ;] D)
    prefix_emb = _embed_ids(embed, prefix_ids, device, dtype)  # (Lp, H)
    ctx, l1_row, l1_len, m_len = _context_rows(soft_d, S.to(dtype) if with_m else None, prefix_emb, with_m)
    positions = sorted({l1_len - 1} | ({m_len - 1} if with_m else set()))
    # The B (+1) context rows, into a cache without the config: no layer crops it to a sliding window.
    keep = torch.tensor(positions, device=device)
    try:
        out = model(inputs_embeds=ctx, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=keep)
        ctx_logits = out.logits  # (R, len(positions), V), through the model's own logit post-processing
    except TypeError as e:  # a (remote-code) model without logits_to_keep: all positions, then pick
        if "logits_to_keep" not in str(e):
            raise
        out = model(inputs_embeds=ctx, past_key_values=DynamicCache(), use_cache=True)
        ctx_logits = out.logits[:, keep]
    kv = _shared_kv(out.past_key_values, ctx.shape[0], ctx.shape[1], model)  # each (R, heads, Lc, hd)

    first = texts.targets[:, 0]  # (B,) first text token, predicted by the last context position
    denom = normalizers(texts, spec.normalize)  # (B,)
    text_emb = embed(texts.tokens[:, :-1])  # (B, L-1, H): the last token predicts nothing
    text_targets = texts.targets[:, 1:]  # (B, L-1)

    # L1: texts after [D ; prefix]
    logp_l1 = torch.log_softmax(ctx_logits[l1_row, positions.index(l1_len - 1)].float(), dim=-1)  # (V,)
    sums_l1 = -logp_l1[first]  # (B,)
    if L > 1:
        zeros = torch.full((B,), l1_row, dtype=torch.long, device=device)
        sums_l1 = sums_l1 + _continue_rows(model, kv, zeros, l1_len, text_emb,
                                           torch.arange(B, device=device), text_targets)
    l1 = (sums_l1 / denom).mean()
    if not with_m:
        return _combine(l1, None, spec)

    # M[i, j]: text j after [D ; S_i ; prefix]
    logp_m = torch.log_softmax(ctx_logits[:B, positions.index(m_len - 1)].float(), dim=-1)  # (B, V)
    sums_m = -logp_m[:, first]  # (B, B)
    if L > 1:
        chunk_rows = resolve_chunk_rows(model, kv, m_len, text_emb, text_targets, B, spec)
        sums_m = sums_m + _m_text_sums(model, kv, m_len, text_emb, text_targets, B, chunk_rows)
    M = sums_m / denom.unsqueeze(0)  # (B, B), column j divided by text j's normaliser
    out = _combine(l1, M, spec)
    out.chunk_rows = chunk_rows if L > 1 else 0
    return out


# ------------------------------------------------------------- straightforward (reference)
def _full_rows_nll(model, soft: torch.Tensor, prefix_emb: torch.Tensor, texts: TextBatch) -> torch.Tensor:
    """(R,) summed NLL of texts after per-row soft tokens, as full sequences `[soft ; prefix ; X]`.

    soft: (R, K, H). Labels are IGNORE_INDEX on soft and prefix positions; HF's shift (position t
    predicts label t + 1) makes the first text token a target, as in the released code.
    """
    embed = model.get_input_embeddings()
    R, K, H = soft.shape
    Lp = prefix_emb.shape[0]
    seq = torch.cat([soft, prefix_emb.expand(R, Lp, H), embed(texts.tokens)], dim=1)  # (R, K+Lp+L, H)
    ignore = texts.targets.new_full((R, K + Lp), IGNORE_INDEX)
    labels = torch.cat([ignore, texts.targets], dim=1)  # (R, K+Lp+L)
    logits = model(inputs_embeds=seq, use_cache=False).logits  # (R, K+Lp+L, V)
    return _token_nll(logits[:, :-1], labels[:, 1:])


def domino_loss_straightforward(model, D: torch.Tensor, S: Optional[torch.Tensor], texts: TextBatch,
                                prefix_ids: Sequence[int] = (), spec: ObjectiveSpec = ObjectiveSpec(),
                                lead_ids: Sequence[int] = ()) -> LossOutput:
    """The same loss, computed the released code's way (reference for tests and the benchmark):
    forward 1 `[D;X_i]` -> L1, forward 2 `[D;S_i;X_i]` -> positives, forwards 3..B+2 `[D;S_i;X_j]`
    for all j -> row i of M (its diagonal recomputed and replaced by forward 2's positives)."""
    _check_inputs(D, S, texts, spec)
    embed = model.get_input_embeddings()
    dtype, device = embed.weight.dtype, embed.weight.device
    texts = texts.to(device)
    B = texts.size
    prefix_emb = _embed_ids(embed, prefix_ids, device, dtype)
    denom = normalizers(texts, spec.normalize)
    soft_d = torch.cat([_embed_ids(embed, lead_ids, device, dtype), D.to(dtype)], dim=0)  # ([BOS ;] D)
    D_rows = soft_d.expand(B, *soft_d.shape)

    l1 = (_full_rows_nll(model, D_rows, prefix_emb, texts) / denom).mean()
    if spec.lambda_ <= 0:
        return _combine(l1, None, spec)
    S = S.to(dtype)
    positives = _full_rows_nll(model, torch.cat([D_rows, S], dim=1), prefix_emb, texts) / denom  # (B,)
    rows = []
    for i in range(B):
        soft_i = torch.cat([D_rows, S[i].expand(B, *S.shape[1:])], dim=1)  # (B, P+Q, H)
        rows.append(_full_rows_nll(model, soft_i, prefix_emb, texts) / denom)
    M = torch.stack(rows)  # (B, B)
    eye = torch.eye(B, dtype=torch.bool, device=device)
    M = torch.where(eye, torch.diag_embed(positives), M)
    return _combine(l1, M, spec)
