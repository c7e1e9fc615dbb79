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

__all__ = ["few_shot_examples", "few_shot_prompt", "few_shot_prompts"]


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


def few_shot_prompts(references: Sequence[str], k: int, template: str, run_seed: int, num_samples: int) -> list[str]:
    """One prompt per seed index 0..num_samples-1 (what DraftStage sends for the few-shot baseline)."""
    return [few_shot_prompt(template, few_shot_examples(references, k, run_seed, s)) for s in range(num_samples)]
