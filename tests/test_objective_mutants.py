"""The objective's small pieces on hand-made tensors, values worked out by hand (what `make mutants`
found reached only through model tests, or not at all): the spec from a config, the normalisers,
the token NLL, the combination L1 + lambda * L2, the logged metrics and the input checks."""

from __future__ import annotations

import math

import pytest
import torch

from domino_ray.config import LearnConfig
from domino_ray.objective import (LossOutput, ObjectiveSpec, TextBatch, _check_inputs, _combine, _token_nll,
                                  contrastive_loss, normalizers, pad_texts)
from domino_ray.schema import IGNORE_INDEX

M = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.5, 1.0], [2.0, 2.0, 1.5]])


def test_spec_reads_every_loss_field_of_the_config():
    cfg = LearnConfig(**{"lambda": 0.3, "tau": 0.5, "contrastive": "infonce", "normalize": "token", "chunk_rows": 3})
    spec = ObjectiveSpec.from_config(cfg)
    assert (spec.lambda_, spec.tau, spec.contrastive, spec.normalize, spec.chunk_rows) == (0.3, 0.5, "infonce",
                                                                                          "token", 3)


def test_normalizers_count_real_tokens_per_sample_or_per_batch():
    texts = pad_texts([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert normalizers(texts, "sample").tolist() == [3.0, 1.0, 2.0]
    assert normalizers(texts, "token").tolist() == [2.0, 2.0, 2.0]  # (3 + 1 + 2) / 3
    with pytest.raises(ValueError, match="learn.normalize is 'word'; use 'sample' or 'token'"):
        normalizers(texts, "word")


def test_token_nll_sums_the_targets_and_skips_ignored_positions():
    # uniform logits over 4 tokens: each target costs log 4; row 2 has one ignored position
    logits = torch.zeros(2, 3, 4)
    targets = torch.tensor([[0, 1, 2], [3, IGNORE_INDEX, 1]])
    assert _token_nll(logits, targets).tolist() == pytest.approx([3 * math.log(4), 2 * math.log(4)])
    peaked = torch.full((1, 1, 4), -1e4)
    peaked[0, 0, 2] = 0.0  # all mass on token 2
    assert _token_nll(peaked, torch.tensor([[2]])).tolist() == pytest.approx([0.0], abs=1e-6)
    assert _token_nll(peaked.half(), torch.tensor([[2]])).dtype == torch.float32  # summed in fp32


def test_combine_is_l1_plus_lambda_times_l2_and_metrics_say_so():
    l1 = torch.tensor(2.0, requires_grad=True)
    spec = ObjectiveSpec(lambda_=0.25, tau=1.0, contrastive="paper")
    out = _combine(l1, M, spec)
    # paper L2 by hand: mean_i [M_ii + log sum_{j!=i} exp(-M_ij)]
    rows = [M[i, i] + torch.log(sum(torch.exp(-M[i, j]) for j in range(3) if j != i)) for i in range(3)]
    l2 = float(sum(rows) / 3)
    assert float(out.l2) == pytest.approx(l2, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(2.0 + 0.25 * l2, rel=1e-6)
    assert out.loss.requires_grad and not out.l1.requires_grad and torch.equal(out.M, M)
    metrics = out.metrics()
    assert metrics["loss"] == pytest.approx(2.0 + 0.25 * l2, rel=1e-6) and metrics["l1"] == 2.0
    assert metrics["m_diag"] == pytest.approx((1.0 + 0.5 + 1.5) / 3)
    assert metrics["m_offdiag"] == pytest.approx((3 + 2 + 4 + 1 + 2 + 2) / 6)
    assert metrics["l2"] == pytest.approx(l2, rel=1e-6)
    plain = _combine(l1, None, spec)  # lambda = 0 path: no M, L = L1
    assert plain.loss is l1 and plain.l2 is None and plain.M is None
    assert all(math.isnan(plain.metrics()[k]) for k in ("l2", "m_diag", "m_offdiag"))
    assert plain.metrics()["loss"] == 2.0


def test_tau_divides_every_variant():
    for variant in ("paper", "infonce", "released"):
        assert float(contrastive_loss(M, variant, tau=2.0)) == pytest.approx(float(contrastive_loss(M / 2, variant)))
    with pytest.raises(ValueError, match=r"learn.contrastive is 'other'; use one of \['infonce', 'paper', 'released'\]"):
        contrastive_loss(M, "other")


def test_input_checks_name_the_shape():
    texts = pad_texts([[1, 2], [3]], pad_id=0)
    D, S = torch.zeros(4, 8), torch.zeros(2, 3, 8)
    _check_inputs(D, S, texts, ObjectiveSpec())  # fine
    _check_inputs(D, None, texts, ObjectiveSpec(lambda_=0.0))  # lambda = 0 needs no S
    with pytest.raises(ValueError, match="batch of 1 sample"):
        _check_inputs(D, S[:1], TextBatch(texts.tokens[:1], texts.targets[:1]), ObjectiveSpec())
    with pytest.raises(ValueError, match=r"D must be \(P, H\), got shape \(4, 8, 1\)"):
        _check_inputs(D[..., None], S, texts, ObjectiveSpec())
    with pytest.raises(ValueError, match=r"S must be \(B=2, Q, H\) when lambda > 0, got None"):
        _check_inputs(D, None, texts, ObjectiveSpec())
    with pytest.raises(ValueError, match=r"got \(3, 3, 8\)"):
        _check_inputs(D, torch.zeros(3, 3, 8), texts, ObjectiveSpec())
    with pytest.raises(ValueError, match=r"got \(2, 8\)"):
        _check_inputs(D, torch.zeros(2, 8), texts, ObjectiveSpec())


def test_loss_output_holds_the_chunking_it_used():
    out = LossOutput(loss=torch.tensor(1.0), l1=torch.tensor(1.0), chunk_rows=4)
    assert out.chunk_rows == 4


def test_batch_sizes_by_hand_and_refusals():
    from domino_ray.objective import batch_sizes, make_batches

    assert batch_sizes(8, 4) == [4, 4]  # ceil(8 / 4) batches
    assert batch_sizes(9, 4) == [3, 3, 3]  # remainder spread, never a batch of 1
    assert batch_sizes(5, 4) == [2, 3]
    assert batch_sizes(7, 2) == [2, 3, 2]  # at most n // 2 batches; bounds round(b * 7 / 3) = 0, 2, 5, 7
    with pytest.raises(ValueError, match=r"cannot cut 6 samples into batches of sizes \[1, 3\] \(each >= 2\)"):
        make_batches(list(range(6)), 2, seed=0, sizes=[1, 3])
    with pytest.raises(ValueError, match="cannot cut 6 samples"):
        make_batches(list(range(6)), 2, seed=0, sizes=[4, 3])  # more than there are
    assert sorted(len(b) for b in make_batches(list(range(6)), 2, seed=0, sizes=[2, 3])) == [2, 3]


def test_m_must_be_square_and_at_least_two_by_two():
    with pytest.raises(ValueError, match=r"^M must be a square \(B, B\) matrix, got shape \(2, 3\)$"):
        contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^M is 1 x 1: a batch of one sample has no negative and the contrastive "
                                         r"denominator is empty; batches must hold >= 2 samples \(make_batches\)$"):
        contrastive_loss(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"denominator is empty otherwise\); build them with objective.make_batches$"):
        _check_inputs(torch.zeros(4, 8), None, pad_texts([[1]], 0), ObjectiveSpec(lambda_=0.0))


def test_combine_passes_tau_and_spec_passes_the_memory_budget():
    from types import SimpleNamespace

    out = _combine(torch.tensor(0.0), M, ObjectiveSpec(lambda_=1.0, tau=0.5, contrastive="released"))
    assert float(out.l2) == pytest.approx(float(contrastive_loss(M, "released", 0.5)))
    cfg = SimpleNamespace(lambda_=1.0, tau=1.0, contrastive="paper", normalize="sample", chunk_rows="auto",
                          memory_budget_gb=2.0)
    assert ObjectiveSpec.from_config(cfg).memory_budget_gb == 2.0


def test_spec_from_a_learn_section_without_a_memory_budget():
    from types import SimpleNamespace

    old = SimpleNamespace(lambda_=1.0, tau=1.0, contrastive="paper", normalize="sample", chunk_rows=0)
    assert ObjectiveSpec.from_config(old).memory_budget_gb is None


def test_l2_variants_default_to_tau_one():
    from domino_ray.objective import l2_infonce, l2_paper, l2_released

    for fn, variant in ((l2_paper, "paper"), (l2_infonce, "infonce"), (l2_released, "released")):
        assert float(fn(M)) == pytest.approx(float(contrastive_loss(M, variant, tau=1.0)))
    # paper by hand at tau = 1 (rows: M_ii + log sum_{j != i} exp(-M_ij))
    rows = [1.0 + math.log(math.exp(-3.0) + math.exp(-2.0)), 0.5 + math.log(math.exp(-4.0) + math.exp(-1.0)),
            1.5 + math.log(math.exp(-2.0) + math.exp(-2.0))]
    assert float(l2_paper(M)) == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_l2_builds_its_masks_and_targets_on_the_device_of_m():
    """The meta device stands for a GPU: an op mixing a meta M with a CPU mask or targets fails, as it
    would with M on CUDA (l2_released indexes with its mask, which works across devices, see
    tools/mutants_equivalent.toml)."""
    from domino_ray.objective import l2_infonce, l2_paper

    on_meta = M.to("meta")
    for fn in (l2_paper, l2_infonce):
        out = fn(on_meta, tau=0.5)
        assert out.device.type == "meta" and out.shape == ()


def test_pad_texts_puts_both_tensors_on_the_device_and_refuses_an_empty_batch():
    batch = pad_texts([[5, 6], [7]], pad_id=1, device="meta")
    assert batch.tokens.device.type == "meta" and batch.targets.device.type == "meta"
    assert batch.tokens.dtype == batch.targets.dtype == torch.long and batch.tokens.shape == (2, 2)
    with pytest.raises(ValueError) as err:
        pad_texts([], pad_id=0)
    assert str(err.value) == "pad_texts: empty batch"


# --------------------------------------------------------------------------------- init_soft_tokens
def _table(rows: int, hidden: int = 4) -> torch.Tensor:
    """Row r is filled with the value r: a drawn row tells which token id it came from."""
    return torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, hidden).contiguous()


def test_init_draws_only_the_real_token_ids():
    from domino_ray.objective import init_soft_tokens

    table = _table(10)
    ids = init_soft_tokens(table, (200,), "vocab", seed=0, num_tokens=3)[:, 0]
    assert set(ids.tolist()) == {0.0, 1.0, 2.0}  # every real id, and only those (rows 3.. are padding)
    assert set(init_soft_tokens(table, (300,), "vocab", seed=0)[:, 0].tolist()) == set(map(float, range(10)))
    assert set(init_soft_tokens(table, (20,), "vocab", seed=0, num_tokens=50)[:, 0].tolist()) <= set(map(float, range(10)))
    one = init_soft_tokens(table, (5,), "vocab", seed=0, num_tokens=1)
    assert torch.equal(one, torch.zeros(5, 4))  # a single real token is enough
    with pytest.raises(ValueError) as err:
        init_soft_tokens(table, (5,), "vocab", seed=0, num_tokens=0)
    assert str(err.value) == "init_soft_tokens: no token ids to draw from (num_tokens=0, table rows=10)"


def test_init_normal_takes_the_scale_of_the_real_tokens_only():
    from domino_ray.objective import init_soft_tokens

    table = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) * 0.02
    table[10:] = 100.0  # untrained padding rows, far off scale
    out = init_soft_tokens(table, (500,), "normal", seed=1, num_tokens=10)
    assert out.std().item() == pytest.approx(table[:10].std().item(), rel=0.1)


def test_init_goes_through_the_embedding_module_and_its_scaling():
    """A Gemma-style embedding scales inside its forward: soft tokens start on the scale the model sees."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from domino_ray.objective import init_soft_tokens

    emb = Gemma3TextScaledWordEmbedding(10, 4, padding_idx=0, embed_scale=3.0)
    with torch.no_grad():
        emb.weight.copy_(_table(10))
    drawn = init_soft_tokens(emb, (2, 50), "vocab", seed=0, num_tokens=4)
    assert drawn.shape == (2, 50, 4) and not drawn.requires_grad
    assert set(drawn[..., 0].flatten().tolist()) == {0.0, 3.0, 6.0, 9.0}  # 3 x ids 0..3
    normal = init_soft_tokens(emb, (4000,), "normal", seed=0, num_tokens=4)
    assert normal.std().item() == pytest.approx(3.0 * _table(4).std().item(), rel=0.05)


def test_init_normal_is_seeded_even_when_it_samples_the_table():
    """Over 65,536 real tokens the std comes from a seeded sample of 65,536 rows (the first of a seeded
    permutation): same seed, same D, and a row left out of the sample does not count."""
    from domino_ray.objective import init_soft_tokens

    rows = 65537
    table = torch.randn(rows, 2, generator=torch.Generator().manual_seed(0))
    left_out = int(torch.randperm(rows, generator=torch.Generator().manual_seed(3))[-1])
    table[left_out] = 1e4  # an outlier the seed-3 sample leaves out; with it the std would be ~39
    first = init_soft_tokens(table, (3000,), "normal", seed=3)
    assert torch.equal(first, init_soft_tokens(table, (3000,), "normal", seed=3))
    assert not torch.equal(first, init_soft_tokens(table, (3000,), "normal", seed=4))
    assert first.std().item() == pytest.approx(1.0, abs=0.1)  # the table's N(0, 1) rows without the outlier
