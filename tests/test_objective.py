"""The DOMINO objective (domino_ray/objective.py): hand-computed L2 values, NLL masking and
normalisation against Hugging Face's own loss, gradient paths, and the KV-cache computation against
the released code's full-sequence formulation on the real tiny backbone."""

from __future__ import annotations

import math

import pytest
import torch

from domino_ray import objective
from domino_ray.objective import (
    ObjectiveSpec,
    contrastive_loss,
    domino_loss,
    domino_loss_straightforward,
    init_soft_tokens,
    l2_infonce,
    l2_paper,
    l2_released,
    make_batches,
    pad_texts,
)
from domino_ray.schema import IGNORE_INDEX

P, Q = 4, 3


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from domino_ray.backbone import load_backbone

    torch.manual_seed(0)
    model, tok = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    return model, tok


def _texts(tok, strings):
    return [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in strings]


SNIPPETS = ["def add(a, b):\n    return a + b", "import os", "x = [i * i for i in range(10) if i % 2]\nprint(x)"]


@pytest.fixture
def soft(lm):
    model, _ = lm
    emb = model.get_input_embeddings().weight
    D = init_soft_tokens(emb, (P,), "vocab", seed=0).requires_grad_()
    S = init_soft_tokens(emb, (len(SNIPPETS), Q), "vocab", seed=1).requires_grad_()
    return D, S


# ------------------------------------------------------------------ L2 on hand-written M
M2 = [[1.0, 3.0], [2.0, 0.5]]
M3 = [[0.5, 2.0, 1.5], [1.0, 0.2, 3.0], [2.5, 0.7, 1.1]]


def test_l2_paper_2x2_closed_form():
    # one negative per row: M_ii/tau + log(exp(-M_ij/tau)) = (M_ii - M_ij)/tau
    M = torch.tensor(M2)
    assert l2_paper(M, tau=1.0).item() == pytest.approx(((1 - 3) + (0.5 - 2)) / 2)
    assert l2_paper(M, tau=0.5).item() == pytest.approx(((1 - 3) + (0.5 - 2)) / 2 / 0.5)


def _by_hand(M, tau, variant):
    B = len(M)
    if variant == "released":
        pos = sum(M[i][i] for i in range(B)) / B / tau
        neg = [math.exp(-M[i][j] / tau) for i in range(B) for j in range(B) if i != j]
        return pos + math.log(sum(neg) / len(neg))
    rows = []
    for i in range(B):
        js = [j for j in range(B) if variant == "infonce" or j != i]
        rows.append(M[i][i] / tau + math.log(sum(math.exp(-M[i][j] / tau) for j in js)))
    return sum(rows) / B


@pytest.mark.parametrize("variant", ["paper", "infonce", "released"])
@pytest.mark.parametrize("M", [M2, M3])
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_l2_variants_match_hand_computation(variant, M, tau):
    got = contrastive_loss(torch.tensor(M, dtype=torch.float64), variant, tau).item()
    assert got == pytest.approx(_by_hand(M, tau, variant), rel=1e-12)


def test_l2_released_2x2_literal():
    expected = (1.0 + 0.5) / 2 + math.log((math.exp(-3.0) + math.exp(-2.0)) / 2)
    assert l2_released(torch.tensor(M2, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)


def test_infonce_is_softmax_cross_entropy_and_above_paper():
    M = torch.tensor(M3)
    assert l2_infonce(M).item() > l2_paper(M).item()  # the own term adds to every denominator
    assert contrastive_loss(M, "infonce").item() == pytest.approx(l2_infonce(M).item())


def test_l2_refuses_a_single_sample_and_unknown_variants():
    with pytest.raises(ValueError, match="no negative"):
        l2_paper(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="contrastive"):
        contrastive_loss(torch.tensor(M2), "triplet")


# ---------------------------------------------------------------------- batching, init
@pytest.mark.parametrize("n", list(range(2, 27)))
@pytest.mark.parametrize("B", [2, 3, 4, 5])
def test_make_batches_covers_every_sample_once_with_two_or_more(n, B):
    batches = make_batches(list(range(100, 100 + n)), B, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(100, 100 + n))
    assert min(len(b) for b in batches) >= 2
    assert max(len(b) for b in batches) <= max(B + 1, 3)


def test_make_batches_fixed_count_and_refusals():
    assert len(make_batches(list(range(13)), 4, seed=0, num_batches=3)) == 3
    assert make_batches(list(range(9)), 4, seed=5) == make_batches(list(range(9)), 4, seed=5)
    assert make_batches(list(range(9)), 4, seed=5) != make_batches(list(range(9)), 4, seed=6)
    with pytest.raises(ValueError, match="at least 2"):
        make_batches([7], 4, seed=0)
    with pytest.raises(ValueError, match=">= 2"):
        make_batches(list(range(8)), 1, seed=0)
    with pytest.raises(ValueError, match="batches of >= 2"):
        make_batches(list(range(5)), 2, seed=0, num_batches=3)


def test_init_soft_tokens_vocab_and_normal():
    weight = torch.randn(50, 8) * 0.02 + 0.1
    vocab = init_soft_tokens(weight, (3, 4), "vocab", seed=1)
    assert vocab.shape == (3, 4, 8) and vocab.dtype == torch.float32
    for row in vocab.view(-1, 8):  # every soft token is a real token embedding
        assert (weight - row).abs().sum(dim=1).min() == 0
    assert torch.equal(vocab, init_soft_tokens(weight, (3, 4), "vocab", seed=1))
    normal = init_soft_tokens(torch.randn(500, 64) * 0.02, (400,), "normal", seed=2)
    assert normal.std().item() == pytest.approx(0.02, rel=0.05)  # table scale, not N(0, 1)
    with pytest.raises(ValueError, match="learn.init"):
        init_soft_tokens(weight, (2,), "zeros", seed=0)


# ------------------------------------------------------------------ NLL and normalisation
def test_pad_texts_masks_padding():
    batch = pad_texts([[5, 6, 7], [8]], pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.targets.tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="no tokens"):
        pad_texts([[1], []], pad_id=0)


def _hf_loss(model, soft, ids):
    """Hugging Face's own mean token loss of `ids` after soft tokens (soft positions ignored)."""
    emb = model.get_input_embeddings()
    tokens = pad_texts(ids, pad_id=0)
    seq = torch.cat([soft.expand(len(ids), *soft.shape[-2:]), emb(tokens.tokens)], dim=1)
    labels = torch.cat([torch.full((len(ids), soft.shape[-2]), IGNORE_INDEX), tokens.targets], dim=1)
    return model(inputs_embeds=seq, labels=labels).loss


def test_l1_matches_hf_loss_per_sample_and_per_token(lm, soft):
    model, tok = lm
    D, _ = soft
    ids = _texts(tok, SNIPPETS)
    assert len({len(x) for x in ids}) > 1  # unequal lengths: padding is exercised
    with torch.no_grad():
        per_sample = sum(_hf_loss(model, D[None], [x]) for x in ids) / len(ids)
        per_token = _hf_loss(model, D[None], ids)  # HF averages over every real token of the batch
        batch = pad_texts(ids, pad_id=tok.pad_token_id)
        sample = domino_loss(model, D, None, batch, spec=ObjectiveSpec(lambda_=0.0, normalize="sample"))
        token = domino_loss(model, D, None, batch, spec=ObjectiveSpec(lambda_=0.0, normalize="token"))
    assert sample.l1.item() == pytest.approx(per_sample.item(), abs=1e-5)
    assert token.l1.item() == pytest.approx(per_token.item(), abs=1e-5)
    assert sample.l1.item() != pytest.approx(token.l1.item(), abs=1e-4)


def test_padding_never_counts(lm, soft):
    model, tok = lm
    D, S = soft
    ids = _texts(tok, SNIPPETS)
    a = pad_texts(ids, pad_id=tok.pad_token_id)
    # same texts with extra padding columns holding another pad id: the loss must not move
    b = pad_texts(ids + [[1] * (a.tokens.shape[1] + 7)], pad_id=7)
    b.tokens, b.targets = b.tokens[:3], b.targets[:3]
    with torch.no_grad():
        la = domino_loss(model, D, S, a)
        lb = domino_loss(model, D, S, b)
    assert la.loss.item() == pytest.approx(lb.loss.item(), abs=1e-5)
    assert torch.allclose(la.M, lb.M, atol=1e-5)


# ----------------------------------------------------------------------------- gradients
def _grads(out, D, S):
    gD, gS = torch.autograd.grad(out.loss, [D, S], allow_unused=True)
    return gD, gS


def test_gradient_paths(lm, soft):
    model, tok = lm
    D, S = soft
    batch = pad_texts(_texts(tok, SNIPPETS), pad_id=tok.pad_token_id)
    gD0, gS0 = _grads(domino_loss(model, D, S, batch, spec=ObjectiveSpec(lambda_=0.0)), D, S)
    assert gD0.abs().sum() > 0          # L1 alone trains D
    assert gS0 is None or gS0.abs().sum() == 0  # S_i enter only through M
    gD1, gS1 = _grads(domino_loss(model, D, S, batch, spec=ObjectiveSpec(lambda_=1.0)), D, S)
    assert (gD1 - gD0).abs().sum() > 0  # L2 reaches D too
    assert all(gS1[i].abs().sum() > 0 for i in range(len(SNIPPETS)))  # every S_i is trained


def test_lambda_zero_is_plain_prompt_tuning_and_computes_no_M(lm, soft):
    model, tok = lm
    D, S = soft
    ids = _texts(tok, SNIPPETS)
    calls = []
    hook = model.base_model.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    try:
        out = domino_loss(model, D, S, pad_texts(ids, tok.pad_token_id), spec=ObjectiveSpec(lambda_=0.0))
        assert len(calls) == 2  # context [D], then the texts: nothing else runs
        calls.clear()
        domino_loss(model, D, S, pad_texts(ids, tok.pad_token_id), spec=ObjectiveSpec(lambda_=1.0))
        assert len(calls) == 3  # + one forward of the B^2 rows of M
    finally:
        hook.remove()
    assert out.M is None and out.l2 is None
    plain = sum(_hf_loss(model, D[None], [x]) for x in ids) / len(ids)
    assert out.loss.item() == pytest.approx(plain.item(), abs=1e-5)


def test_batch_of_one_is_refused(lm, soft):
    model, tok = lm
    D, S = soft
    one = pad_texts(_texts(tok, SNIPPETS[:1]), tok.pad_token_id)
    for fn in (domino_loss, domino_loss_straightforward):
        for lam in (0.0, 1.0):
            with pytest.raises(ValueError, match=">= 2 samples"):
                fn(model, D, S[:1], one, spec=ObjectiveSpec(lambda_=lam))


# ------------------------------------------------------- efficient == straightforward
@pytest.mark.parametrize("variant", ["paper", "infonce", "released"])
@pytest.mark.parametrize("normalize", ["sample", "token"])
@pytest.mark.parametrize("prefix", ["", "# task:\n"])
def test_kv_cache_path_equals_full_sequences(lm, soft, variant, normalize, prefix):
    model, tok = lm
    D, S = soft
    batch = pad_texts(_texts(tok, SNIPPETS), tok.pad_token_id)
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    spec = ObjectiveSpec(lambda_=0.7, tau=0.8, contrastive=variant, normalize=normalize)
    fast = domino_loss(model, D, S, batch, prefix_ids, spec)
    ref = domino_loss_straightforward(model, D, S, batch, prefix_ids, spec)
    for name in ("loss", "l1", "l2"):
        assert getattr(fast, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-5), name
    assert torch.allclose(fast.M, ref.M, atol=1e-5)
    for a, b in zip(_grads(fast, D, S), _grads(ref, D, S)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_chunked_M_equals_unchunked(lm, soft, chunk_rows):
    model, tok = lm
    D, S = soft
    batch = pad_texts(_texts(tok, SNIPPETS), tok.pad_token_id)
    whole = domino_loss(model, D, S, batch, spec=ObjectiveSpec(chunk_rows=0))
    chunked = domino_loss(model, D, S, batch, spec=ObjectiveSpec(chunk_rows=chunk_rows))
    assert torch.allclose(whole.M, chunked.M, atol=1e-6)
    assert chunked.loss.item() == pytest.approx(whole.loss.item(), abs=1e-6)
    for a, b in zip(_grads(whole, D, S), _grads(chunked, D, S)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_metrics_report_the_diagonal_and_off_diagonal(lm, soft):
    model, tok = lm
    D, S = soft
    with torch.no_grad():
        out = domino_loss(model, D, S, pad_texts(_texts(tok, SNIPPETS), tok.pad_token_id))
    m = out.metrics()
    off = out.M[~torch.eye(3, dtype=torch.bool)]
    assert m["m_diag"] == pytest.approx(out.M.diagonal().mean().item())
    assert m["m_offdiag"] == pytest.approx(off.mean().item())
    assert m["loss"] == pytest.approx(m["l1"] + m["l2"], abs=1e-5)


# ------------------------------------------------- the total, by hand (lambda != 1)
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_total_is_l1_plus_lambda_times_l2_against_a_hand_loop(lm, soft, variant):
    """L = L1 + lambda * L2 with L1 and every M[i, j] from Hugging Face's own loss, one sample at a time,
    and L2 from the formula written out: nothing shared with the code under test but the model."""
    model, tok = lm
    D, S = soft
    ids = _texts(tok, SNIPPETS)
    lam, tau = 0.3, 0.7
    with torch.no_grad():
        l1 = sum(_hf_loss(model, D[None], [x]).item() for x in ids) / len(ids)
        M = [[_hf_loss(model, torch.cat([D, S[i]])[None], [ids[j]]).item() for j in range(len(ids))]
             for i in range(len(ids))]
    expected = l1 + lam * _by_hand(M, tau, variant)
    spec = ObjectiveSpec(lambda_=lam, tau=tau, contrastive=variant)
    batch = pad_texts(ids, tok.pad_token_id)
    for fn in (domino_loss, domino_loss_straightforward):
        out = fn(model, D, S, batch, (), spec)
        assert out.l1.item() == pytest.approx(l1, abs=1e-5)
        torch.testing.assert_close(out.M, torch.tensor(M), atol=1e-5, rtol=1e-6)
        assert out.loss.item() == pytest.approx(expected, abs=1e-5), fn.__name__


# ------------------------------------------------------------------ chunk_rows: auto
def _forward_count(model, fn):
    calls = []
    hook = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = fn()
    finally:
        hook.remove()
    return out, len(calls)


@pytest.mark.parametrize("budget_gb, m_forwards", [(1e-9, 9), (1e3, 1)], ids=["tight", "ample"])
def test_chunk_rows_auto_follows_the_memory_budget_and_changes_no_result(lm, soft, budget_gb, m_forwards):
    model, tok = lm
    D, S = soft
    batch = pad_texts(_texts(tok, SNIPPETS), tok.pad_token_id)
    whole = domino_loss(model, D, S, batch, spec=ObjectiveSpec(chunk_rows=0))
    objective._ROW_COST.clear()  # the per-row cost is measured once per model: make this test measure it
    auto, calls = _forward_count(model, lambda: domino_loss(
        model, D, S, batch, spec=ObjectiveSpec(chunk_rows="auto", memory_budget_gb=budget_gb)))
    assert calls == 2 + 1 + m_forwards  # context, L1 texts, the cost probe, the M rows in chunks
    torch.testing.assert_close(auto.M, whole.M, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(auto, D, S), _grads(whole, D, S)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunk_rows_auto_measures_a_per_row_cost_that_grows_with_the_text(lm, soft):
    from domino_ray.objective import resolve_chunk_rows

    model, tok = lm
    D, S = soft
    B = len(SNIPPETS)
    emb = model.get_input_embeddings()
    kv_ctx = model(inputs_embeds=torch.cat([D.expand(B, *D.shape), S], dim=1), use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in kv_ctx.layers]
    ids = torch.randint(5, 200, (B, 65))
    budget = 50e6 / 1024**3  # 50 MB
    spec = ObjectiveSpec(chunk_rows="auto", memory_budget_gb=budget)
    short = resolve_chunk_rows(model, kv, P + Q, emb(ids[:, :16]), ids[:, 1:17], B, spec)
    long = resolve_chunk_rows(model, kv, P + Q, emb(ids[:, :64]), ids[:, 1:65], B, spec)
    assert 1 <= long < short or (short == 0 and long >= 1)  # longer texts: fewer rows per chunk
    with pytest.raises(ValueError, match="chunk_rows"):
        resolve_chunk_rows(model, kv, P + Q, emb(ids[:, :16]), ids[:, 1:17], B, ObjectiveSpec(chunk_rows="big"))
