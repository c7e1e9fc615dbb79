"""Few-shot draft prompts: the baseline a user tries first (DESIGN.md section 11, the `few-shot` arm).

Instead of the learned soft prompt D, each draft request shows the instruct model k references as
examples and asks for a new problem of the same kind (in the spirit of MAGPIE few-shot prompting and
OSS-Instruct). The k examples of seed index s are drawn without replacement with a generator seeded
by (run.seed, s), so every draft can be regenerated alone and every arm of a study that uses the
same seeds sees the same examples. Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

__all__ = ["few_shot_examples", "few_shot_prompt", "check_few_shot_fits"]


def few_shot_examples(references: Sequence[str], k: int, run_seed: int, seed_index: int) -> list[str]:
    """The k references shown to draft `seed_index` (all of them when there are fewer than k)."""
    if not references:
        raise ValueError("few-shot drafts need references; references.source gave none")
    digest = hashlib.sha256(f"few-shot\x00{run_seed}\x00{seed_index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return rng.sample(list(references), min(k, len(references)))


def few_shot_prompt(template: str, examples: Sequence[str]) -> str:
    """`template` with {examples} replaced by the examples, each under a `### Example N` line."""
    block = "\n\n".join(f"### Example {i}\n{text.strip()}" for i, text in enumerate(examples, start=1))
    return template.replace("{examples}", block)


def check_few_shot_fits(tokenizer, references: Sequence[str], k: int, template: str, chat: bool, max_tokens: int,
                        max_model_len: int) -> int:
    """The longest few-shot prompt any seed can get (the k longest references), in tokens; raises
    ValueError with the arithmetic when it and `max_tokens` do not fit the draft engine's context, which
    would otherwise turn every such draft into an engine error, late and one row at a time."""
    from domino_ray.engines.base import chat_prompt_ids

    def length(text: str) -> int:  # as the draft engine encodes a plain prompt
        return len(tokenizer(text)["input_ids"])

    longest = sorted(references, key=length, reverse=True)[:k]
    prompt = few_shot_prompt(template, longest)
    tokens = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])) if chat else length(prompt)
    if tokens + max_tokens > max_model_len:
        raise ValueError(
            f"few-shot drafts: the longest prompt ({k} longest references + template) is {tokens} tokens and a draft "
            f"may add {max_tokens}: {tokens} + {max_tokens} = {tokens + max_tokens} > "
            f"synthesize.draft.engine.max_model_len {max_model_len}. Raise max_model_len, lower "
            f"synthesize.draft.few_shot ({k}) or references.max_tokens")
    return tokens
