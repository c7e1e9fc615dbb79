"""The method study's parts: the held-out split, the held-out NLL (against a hand-written loop over the
model's forward), few-shot prompts, the per-arm configs; and a reduced study end to end (slow)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml

from domino_ray.config import config_from_dict
from domino_ray.references import ReferenceError, load_references, read_reference_split, split_holdout
from domino_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def write_refs(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


TEXTS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(10)]


# ------------------------------------------------------------------------------------ the split
def test_holdout_takes_the_smallest_text_hashes_whatever_the_file_order(tmp_path):
    by_hash = sorted(TEXTS, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    pairs = [(t, f"f:{i}") for i, t in enumerate(TEXTS)]
    kept, held = split_holdout(pairs, 3)
    assert sorted(t for t, _ in held) == sorted(by_hash[:3])
    assert [t for t, _ in kept] == [t for t in TEXTS if t not in by_hash[:3]]  # input order kept
    kept_r, held_r = split_holdout(pairs[::-1], 3)
    assert sorted(held_r) == sorted(held) and sorted(kept_r) == sorted(kept)
    assert split_holdout(pairs, 0) == (pairs, [])


def test_learn_never_sees_the_held_out_references(tiny_model_dir, tmp_path):
    from domino_ray.backbone import load_tokenizer

    src = write_refs(tmp_path / "refs.jsonl", TEXTS + [TEXTS[0]])  # a duplicate is dropped before the split
    cfg = config_from_dict({"references": {"source": src, "holdout": 4}}).references
    train, held = read_reference_split(cfg, Storage())
    assert len(train) == 6 and len(held) == 4 and not set(train) & set(held)
    assert set(train) | set(held) == set(TEXTS)
    refs = load_references(cfg, load_tokenizer(str(tiny_model_dir)), Storage())
    assert refs.texts == train and refs.stats["held_out"] == 4


def test_a_holdout_that_leaves_no_contrastive_batch_is_refused(tmp_path):
    src = write_refs(tmp_path / "refs.jsonl", TEXTS[:5])
    cfg = config_from_dict({"references": {"source": src, "holdout": 4}}).references
    with pytest.raises(ReferenceError, match=r"references.holdout=4 leaves 1 of the 5"):
        read_reference_split(cfg, Storage())


# ------------------------------------------------------------------------------------ the NLL
def hand_nll(model, context: list[int], target: list[int]) -> float:
    """Mean NLL of `target` after `context`, one next-token prediction at a time (no batching, no
    padding, no shifting: a forward over the prefix and log_softmax of its last position)."""
    import torch

    total = 0.0
    seq = list(context)
    with torch.no_grad():
        for tok in target:
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, dim=-1)[tok])
            seq.append(tok)
    return total / len(target)


def test_heldout_nll_matches_a_hand_written_next_token_loop(tiny_model_dir):
    from domino_ray.backbone import load_backbone
    from domino_ray.evaluate.nll import encode_heldout, sample_nlls, summarize_nlls

    model, tok = load_backbone(str(tiny_model_dir), device="cpu")
    texts = ["def add(a, b):\n    return a + b\n", "x = 1", "for i in range(3):\n    print(i * i)\n" * 3]
    context, targets = encode_heldout(texts, tok, max_tokens=40)
    assert context == [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    assert all(t[-1] == tok.eos_token_id for t in targets)
    assert len(targets[2]) == 40  # cut to max_tokens with EOS kept last
    assert targets[1] == tok("x = 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected = [hand_nll(model, context, t) for t in targets]
    got = sample_nlls(model, context, targets, batch_size=2, pad_id=tok.pad_token_id)  # pads in each batch
    assert [n for _, n in got] == [len(t) for t in targets]
    for (s, n), e in zip(got, expected):
        assert s / n == pytest.approx(e, rel=1e-4)
    summary = summarize_nlls(got)
    assert summary["nll"] == pytest.approx(sum(expected) / 3, rel=1e-4)
    token_mean = sum(e * len(t) for e, t in zip(expected, targets)) / sum(len(t) for t in targets)
    assert summary["token_nll"] == pytest.approx(token_mean, rel=1e-4)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["nll"]))


def test_heldout_nll_with_a_prefix_scores_only_the_text(tiny_model_dir):
    from domino_ray.backbone import load_backbone
    from domino_ray.evaluate.nll import encode_heldout, sample_nlls

    model, tok = load_backbone(str(tiny_model_dir), device="cpu")
    context, targets = encode_heldout(["return 0"], tok, max_tokens=64, prefix="# Python\n")
    assert context == tok("# Python\n", add_special_tokens=False)["input_ids"]
    (s, n), = sample_nlls(model, context, targets, batch_size=4, pad_id=tok.pad_token_id)
    assert n == len(targets[0]) and s / n == pytest.approx(hand_nll(model, context, targets[0]), rel=1e-4)


# ------------------------------------------------------------------------------------ few-shot
def test_few_shot_prompts_are_seeded_per_draft_and_show_k_examples():
    from domino_ray.synthesize.fewshot import few_shot_examples, few_shot_prompt

    def few_shot_prompts(texts, k, template, run_seed, num_samples):  # what DraftStage sends, seed by seed
        return [few_shot_prompt(template, few_shot_examples(texts, k, run_seed, s)) for s in range(num_samples)]

    template = "Examples:\n{examples}\nNew one:"
    prompts = few_shot_prompts(TEXTS, 3, template, run_seed=7, num_samples=6)
    assert prompts == few_shot_prompts(TEXTS, 3, template, run_seed=7, num_samples=6)
    assert prompts != few_shot_prompts(TEXTS, 3, template, run_seed=8, num_samples=6)
    for s, p in enumerate(prompts):
        shown = few_shot_examples(TEXTS, 3, 7, s)
        assert len(set(shown)) == 3 and set(shown) <= set(TEXTS)
        assert sum(t.strip() in p for t in TEXTS) == 3 and "### Example 3\n" in p and "### Example 4" not in p
        assert p.startswith("Examples:\n### Example 1\n") and p.endswith("\nNew one:")
    assert len(set(prompts)) > 1  # different drafts see different examples
    assert len(few_shot_examples(TEXTS[:2], 5, 0, 0)) == 2


def test_few_shot_prompts_that_cannot_fit_the_draft_context_are_refused_with_the_arithmetic(tiny_model_dir):
    """The bound is the prompt of the k longest references, counted here with the tokenizer directly; one
    token less of context than prompt + max_tokens is refused, exactly enough is accepted."""
    from transformers import AutoTokenizer

    from domino_ray.synthesize.fewshot import check_few_shot_fits

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    refs = ["def a(): pass", "def bb(x):\n    return x * 2 + 1  # longer", "x = 1",
            "def ccc(values):\n    " + "total = sum(values) + len(values)\n    " * 6 + "return total"]
    template = "Examples:\n{examples}\nNew one:"
    longest_two = "Examples:\n### Example 1\n" + refs[3] + "\n\n### Example 2\n" + refs[1] + "\nNew one:"
    need = len(tok(longest_two)["input_ids"])
    assert check_few_shot_fits(tok, refs, 2, template, False, 40, need + 40) == need
    with pytest.raises(ValueError, match=rf"{need} \+ 40 = {need + 40} > synthesize.draft.engine.max_model_len "
                                         rf"{need + 39}"):
        check_few_shot_fits(tok, refs, 2, template, False, 40, need + 39)


# ------------------------------------------------------------------------------------ arm configs
def study_cfg(model_dir: Path, output: str, **sections):
    data = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    data["backbone"] = {"model": str(model_dir)}
    data["run"]["output"] = output
    data["references"] = {"source": "humaneval:0:12", "holdout": 4}
    for name, over in sections.items():
        data[name] = {**data.get(name, {}), **over}
    return config_from_dict(data)


def test_every_arm_shares_references_seeds_and_budgets_and_differs_only_where_it_should(tiny_model_dir, tmp_path):
    from domino_ray.pipeline import stage_fingerprints
    from domino_ray.study import arm_config, base_config

    cfg = study_cfg(tiny_model_dir, str(tmp_path), study={"few_shot_k": 2, "lambda_domino": 0.5})
    arms = {a: arm_config(cfg, a) for a in cfg.study.arms}
    for arm, c in arms.items():
        assert c.run.output == str(tmp_path / "arms" / arm)
        assert (c.run.name, c.run.seed, c.references, c.synthesize.num_samples) == \
               (cfg.run.name, cfg.run.seed, cfg.references, cfg.synthesize.num_samples)
        assert (c.finetune.epochs, c.finetune.lr, c.evaluate.benchmark) == (cfg.finetune.epochs, cfg.finetune.lr, cfg.evaluate.benchmark)
        assert not c.report.enabled and not c.evaluate.compare_base  # one base evaluation, one study report
    assert arms["domino"].learn.lambda_ == 0.5 and arms["l1-only"].learn.lambda_ == 0.0
    assert arms["few-shot"].synthesize.draft.few_shot == 2 and arms["few-shot"].synthesize.draft.engine.chat_template
    assert not arms["no-prompt"].synthesize.draft.enabled and arms["no-prompt"].synthesize.draft.few_shot == 0
    assert arms["reference-sft"].finetune.data == "references"
    storage = Storage()
    stages = {a: list(stage_fingerprints(c, storage)) for a, c in arms.items()}
    tail = ["finetune", "evaluate_finetuned", "heldout_nll_finetuned"]
    assert stages["domino"] == stages["l1-only"] == ["learn", "synthesize", *tail]
    assert stages["few-shot"] == stages["no-prompt"] == ["synthesize", *tail]  # no soft prompt, no learn
    assert stages["reference-sft"] == tail
    assert list(stage_fingerprints(base_config(cfg), storage)) == ["evaluate_base", "heldout_nll_base"]


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_reduced_study_end_to_end(tiny_model_dir, tmp_path, ray_cluster):
    """Base + the two arms whose paths differ (learn, the soft prompt and SFT on synthetic records;
    SFT on the references alone), tiny budgets; then a re-run skips it all. The few-shot arm's drafts
    (prompts built per seed in the draft actor, no D) are tests/synthesize/test_run.py's
    test_few_shot_prompts_are_built_per_seed_by_the_draft_actor, its config the test above."""
    from domino_ray.evaluate.nll import encode_heldout, heldout_texts
    from domino_ray.study import run_study

    cfg = study_cfg(tiny_model_dir, str(tmp_path / "study"),
                    # the tiny model is no instruct model: in a chat it answers nothing, so it continues plain text
                    study={"arms": ["domino", "reference-sft"]},
                    synthesize={"num_samples": 4, "block_size": 4,
                                "draft": {"engine": {"kind": "hf", "max_model_len": 768}, "pool": {"batch_size": 4},
                                          "sampling": {"max_tokens": 24}, "reject_truncated": False}},
                    finetune={"lr": 5e-3},
                    evaluate={"benchmark": "humaneval:100:101", "num_samples": 2, "k": [1, 2],
                              "sampling": {"temperature": 0.8, "max_tokens": 16}})
    out = run_study(cfg, print_summary=False)
    runs = out["runs"]
    assert list(runs) == ["base", "domino", "reference-sft"]
    assert all(r["status"] == "completed" for r in runs.values()), {k: r.get("error") for k, r in runs.items()}
    assert runs["domino"]["records"] == 4 and runs["domino"]["accepted"] is not None
    assert runs["reference-sft"]["records"] is None and runs["reference-sft"]["finetune_examples"] == 8

    # the held-out NLL the study reports, recomputed by hand: base, and base + reference-SFT adapter
    from peft import PeftModel

    from domino_ray.backbone import load_backbone

    texts, _ = heldout_texts(cfg)
    assert len(texts) == 4
    model, tok = load_backbone(str(tiny_model_dir), device="cpu")
    context, targets = encode_heldout(texts, tok, cfg.references.max_tokens)
    base = sum(hand_nll(model, context, t) for t in targets) / len(targets)
    assert runs["base"]["heldout_nll"] == pytest.approx(base, rel=1e-4)
    tuned = PeftModel.from_pretrained(model, str(tmp_path / "study" / "arms" / "reference-sft" / "finetune" / "adapter")).eval()
    expected = sum(hand_nll(tuned, context, t) for t in targets) / len(targets)
    assert runs["reference-sft"]["heldout_nll"] == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(base, rel=1e-6)  # the adapter was applied
    for r in runs.values():
        assert set(r["pass_at_k"]) == {"pass@1", "pass@2"} and r["n"] == 2
    # what `domino run` puts in its results (and the manifest's pipeline record) for the summary
    record = json.loads((tmp_path / "study" / "base" / "manifest.json").read_text())["stages"]["pipeline"]
    assert record["heldout_nll"]["base"] == runs["base"]["heldout_nll"] and record["heldout_nll"]["num_samples"] == 4
    record = json.loads((tmp_path / "study" / "arms" / "reference-sft" / "manifest.json").read_text())["stages"]["pipeline"]
    assert record["heldout_nll"]["finetuned"] == runs["reference-sft"]["heldout_nll"] and record["heldout_nll"]["base"] is None

    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["status"] == "completed" and study["runs"]["domino"]["heldout_nll"] == runs["domino"]["heldout_nll"]
    html = (tmp_path / "study" / "report" / "study.html").read_text()
    md = (tmp_path / "study" / "report" / "study.md").read_text()
    assert (tmp_path / "study" / "report" / "study.png").stat().st_size > 1000
    table = md.split("## Study: every arm, every metric", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].strip("| ") for line in lines[1:]] == ["base model", "domino", "reference-sft",
                                                                        "held-out (real)"]
    assert f"{runs['base']['heldout_nll']:.3f}" in lines[1] and f"{runs['reference-sft']['heldout_nll']:.3f}" in lines[3]
    assert "MMD²" in lines[0] and "8-gram overlap" in lines[0] and "pass@2" in lines[0]
    assert all(arm in html for arm in ("domino", "reference-sft")) and "data:image/png;base64," in html

    again = run_study(cfg, print_summary=False, report=False)  # every arm reuses what it finished
    assert all(info["status"] == "skipped" for r in again["runs"].values() for info in r["stages"].values())
