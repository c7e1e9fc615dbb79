"""The one home of data contracts: the synthetic-record Arrow schema, column and stage names,
reject reasons and shared constants (DESIGN.md section 5). Other modules import these names and
never respell the strings."""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

__all__ = [
    "IGNORE_INDEX",
    "STAGES",
    "REJECT_REASONS",
    "EXEC_STATUSES",
    "RECORD_SCHEMA",
    "SYNTH_WORK_SCHEMA",
    "EXEC_FAILURES",
    "EVAL_RESULT_SCHEMA",
    "sample_id",
    "empty_record",
    "validate_records",
]

# Label value that never counts as a target (padding, prompt tokens).
IGNORE_INDEX = -100

# Synthesis stages, in plan order (DESIGN section 4).
STAGES = ("draft", "respond", "judge", "execute", "filter")

# `reject_reason` values: the first failed check, in the order checks run.
REJECT_REASONS = (
    "empty_draft",
    "draft_truncated",
    "empty_response",
    "judge_unparsed",
    "judge_below_threshold",
    "exec_failed",
    "syntax_error",
    "duplicate",
    "contaminated",
    "not_novel",
)

# `exec_status` values, shared with the sandbox and evaluation results. `refused`: assert-style
# tests were not run because the code uses a construct that can end or hijack the test process
# (domino_ray.evaluate.checks.refusal).
EXEC_STATUSES = ("passed", "failed", "error", "timeout", "limit", "refused", "skipped")
# The statuses that reject a synthetic sample (reason exec_failed); `skipped` (no tests) does not.
EXEC_FAILURES = ("failed", "error", "timeout", "limit", "refused")

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha of (run, seed_index): stable across restarts
        pa.field("seed_index", pa.int64(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("draft", pa.string()),
        pa.field("response", pa.string()),
        pa.field("tests", pa.string()),
        pa.field("judge_score", pa.float64()),
        pa.field("judge_raw", pa.string()),
        pa.field("syntax_ok", pa.bool_()),
        pa.field("exec_status", pa.string()),
        pa.field("duplicate_of", pa.int64()),  # seed_index of the kept member of its cluster
        pa.field("contaminated", pa.bool_()),
        pa.field("novel", pa.bool_()),
        pa.field("accepted", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),
        # generation parameters and token counts
        pa.field("draft_seed", pa.int64()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("draft_finish_reason", pa.string()),
        pa.field("draft_tokens", pa.int64()),
        pa.field("response_tokens", pa.int64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("backbone", pa.string()),
        pa.field("representation_sha256", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Synthesis work files (<run>/synth/work/part-*.parquet): one per finished seed block, written by the
# streaming phase before the global dedup pass. RECORD_SCHEMA plus what that pass and the manifest need.
SYNTH_WORK_SCHEMA = pa.schema(
    list(RECORD_SCHEMA)
    + [
        pa.field("block", pa.int64(), nullable=False),
        pa.field("dedup_key", pa.string()),  # hash of the normalised draft (exact duplicates)
        pa.field("minhash", pa.binary()),  # MinHash signature of the draft (near duplicates)
        pa.field("novelty_overlap", pa.float64()),  # largest n-gram overlap with one reference
        pa.field("judge_error", pa.string()),  # why the judge answer did not parse
        pa.field("exec_detail", pa.string()),
        pa.field("response_prompt_tokens", pa.int64()),
        pa.field("tests_tokens", pa.int64()),
        pa.field("tests_prompt_tokens", pa.int64()),
        pa.field("judge_tokens", pa.int64()),
        pa.field("judge_prompt_tokens", pa.int64()),
    ]
)

EVAL_RESULT_SCHEMA = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("program", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("passed", pa.bool_(), nullable=False),
        pa.field("exit_code", pa.int64()),
        pa.field("detail", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("completion_tokens", pa.int64()),
        # how the verdict was reached: data (outputs compared outside the sandbox) | assert | none
        pa.field("verdict_path", pa.string()),
    ]
)


def sample_id(run: str, seed_index: int) -> str:
    """Deterministic id of a synthetic sample: the same (run, seed index) always gives the same id."""
    return hashlib.sha256(f"{run}\x00{seed_index}".encode()).hexdigest()[:24]


def empty_record(run: str, seed_index: int) -> dict[str, Any]:
    """A record with every column present (nulls), id and seed filled, not yet accepted."""
    row: dict[str, Any] = {name: None for name in RECORD_SCHEMA.names}
    row.update(id=sample_id(run, seed_index), seed_index=int(seed_index), run=run, accepted=False)
    return row


def validate_records(table: pa.Table) -> pa.Table:
    """Cast a table to RECORD_SCHEMA, naming missing or extra columns."""
    missing = [n for n in RECORD_SCHEMA.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in RECORD_SCHEMA.names]
    if missing or extra:
        raise ValueError(f"records do not match RECORD_SCHEMA: missing columns {missing}, unexpected columns {extra}")
    bad = [r for r in table.column("reject_reason").to_pylist() if r is not None and r not in REJECT_REASONS]
    if bad:
        raise ValueError(f"unknown reject_reason values {sorted(set(bad))}; known: {REJECT_REASONS}")
    return table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
