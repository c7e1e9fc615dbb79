"""Ray Data callable classes of the synthesis plan, one per stage of DESIGN.md section 4.

Each class builds its heavy state once in `__init__` (an engine, the soft prompt, n-gram indexes, a
sandbox) and maps a numpy batch to a numpy batch with its own columns added. They are plain
callables: tests feed them dict batches without a cluster.

LLM stages wrap `domino_ray.engines.stage.LLMStage` and send it only the rows that are still
accepted: a response to an empty draft, or a grade of an empty response, is engine time spent on a
row that is rejected anyway. Rows skipped that way keep null in the skipped stage's columns. On
vLLM they run its async engine with several batches in flight per actor (the plan's pools allow
`pool.max_concurrent_batches` concurrent calls, `engines.stage.with_batches_in_flight`); their
`__call__` is thread-safe and stays a plain synchronous callable. The probability judge reads
next-token log-probabilities from the batch engine (one forward pass per row, no decode tail).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

import numpy as np

from domino_ray import schema
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.drafts import END_AT, assert_tests, cut_draft, statement_imports
from domino_ray.synthesize.judge import (expected_grade, fill_template, grade_token_ids, judge_verdict,
                                        parse_judge_score, rubric_grades)
from domino_ray.synthesize.fewshot import few_shot_examples, few_shot_prompt
from domino_ray.synthesize.metrics import SynthMetrics
from domino_ray.synthesize.records import batch_to_rows, rows_to_batch, rows_to_table, utc_now, write_table
from domino_ray.synthesize.verdicts import RejectRules, first_failure

__all__ = [
    "SEED_COLUMNS",
    "expand_blocks",
    "DraftStage",
    "RespondStage",
    "TestsStage",
    "JudgeStage",
    "ExecuteStage",
    "RowFilterStage",
    "BlockWriter",
    "load_decontamination_texts",
]

log = logging.getLogger(__name__)

# per-request seed column of each LLM stage (derived from run.seed and the seed index)
SEED_COLUMNS = {"draft": "draft_seed", "respond": "response_seed", "tests": "tests_seed", "judge": "judge_seed"}
_PROMPT = "_prompt"  # request text column handed to LLMStage, never stored


def _storage(s3_cfg: Optional[dict]):
    from domino_ray.config import S3Config
    from domino_ray.storage import Storage

    return Storage(S3Config(**(s3_cfg or {})))


# ------------------------------------------------------------------------------------------ seeds
def expand_blocks(batch: dict[str, np.ndarray], *, num_samples: int, block_size: int,
                  run_seed: int) -> dict[str, np.ndarray]:
    """Seed block ids -> one row per seed index with its request seeds.

    Column `ids`: the seed blocks of each input row (`blocks.task_groups`; one block, or the remainder
    block with its neighbour). Column `id` (one block per row) is read too."""
    if "ids" in batch:
        ids = [int(b) for group in batch["ids"] for b in np.asarray(group).tolist()]
    else:
        ids = [int(b) for b in batch["id"].tolist()]
    seeds = [s for b in ids for s in blocks.block_seeds(b, num_samples, block_size)]
    out = {"seed_index": np.asarray(seeds, dtype=np.int64),
           "block": np.asarray([blocks.block_of(s, block_size) for s in seeds], dtype=np.int64)}
    for stage, column in SEED_COLUMNS.items():
        out[column] = np.asarray([blocks.request_seed(run_seed, s, stage) for s in seeds], dtype=np.int64)
    return out


def _require(stage: Any, batch: dict, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in batch]
    if missing:
        raise KeyError(f"{type(stage).__name__}: required input columns {missing} not found; input columns: "
                       f"{sorted(batch)}")


# ------------------------------------------------------------------------------------ LLM stages
class _LLMRole:
    """Common shape of the LLM stages: choose rows, build prompts, call the engine, read the answer."""

    role = ""  # metrics/token name
    output = ""  # LLMStage output column
    after: Optional[str] = None  # rows rejected by the stages up to this one are skipped
    columns: tuple[str, ...] = ()  # columns this stage adds (null for skipped rows)
    inputs: tuple[str, ...] = ()  # columns this stage reads (besides its seed column)

    def __init__(self, *, engine_cfg: dict, backbone_cfg: dict, sampling: dict, run: str, rules: dict,
                 storage_cfg: Optional[dict] = None, representation_uri: Optional[str] = None, prefix: str = "",
                 asynchronous: bool = True, **options: Any):
        from domino_ray.engines.stage import LLMStage

        self.rules = RejectRules(**rules)
        self.options = options
        self.metrics = SynthMetrics(run)
        self.llm = LLMStage(engine_cfg=engine_cfg, backbone_cfg=backbone_cfg, sampling=sampling,
                            input_column=_PROMPT, output_column=self.output,
                            chat=bool(engine_cfg.get("chat_template")), representation_uri=representation_uri,
                            storage_cfg=storage_cfg, seed_column=SEED_COLUMNS[self.role], prefix=prefix,
                            asynchronous=asynchronous)

    # -- hooks -----------------------------------------------------------------------------------
    def wants(self, row: dict) -> bool:
        return self.after is None or first_failure(row, self.rules, upto=self.after) is None

    def prompt(self, row: dict) -> Optional[str]:
        raise NotImplementedError

    def take(self, row: dict, answer: dict) -> None:
        raise NotImplementedError

    def verdict(self, row: dict, ran: bool) -> str:
        return "ok" if ran else "not_run"

    # -- driver ----------------------------------------------------------------------------------
    def _request_batch(self, rows: list[dict]) -> dict[str, np.ndarray]:
        seed_col = SEED_COLUMNS[self.role]
        batch = {seed_col: np.asarray([int(r[seed_col]) for r in rows], dtype=np.int64)}
        prompts = [self.prompt(r) for r in rows]
        if any(p is not None for p in prompts):
            batch[_PROMPT] = np.asarray(prompts, dtype=object)
        return batch

    def _answers(self, rows: list[dict]) -> list[dict]:
        """One answer per row (the LLMStage output columns)."""
        return batch_to_rows(self.llm(self._request_batch(rows)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _require(self, batch, self.inputs + (SEED_COLUMNS[self.role],))
        rows = batch_to_rows(batch)
        for r in rows:
            for c in self.columns:
                r.setdefault(c, None)
        todo = [i for i, r in enumerate(rows) if self.wants(r)]
        if todo:
            answers = self._answers([rows[i] for i in todo])
            if len(answers) != len(todo):
                raise RuntimeError(f"{type(self).__name__}: engine returned {len(answers)} rows for {len(todo)} requests")
            prompt_tokens = completion_tokens = 0
            for i, answer in zip(todo, answers):
                self.take(rows[i], answer)
                prompt_tokens += int(answer.get(f"{self.output}_prompt_tokens") or 0)
                completion_tokens += int(answer.get(f"{self.output}_tokens") or 0)
            self.metrics.tokens(self.role, prompt_tokens, completion_tokens)
        done = set(todo)
        counts: dict[str, int] = defaultdict(int)
        for i, r in enumerate(rows):
            counts[self.verdict(r, i in done)] += 1
        for verdict, n in counts.items():
            self.metrics.samples(self.role, verdict, n)
        return rows_to_batch(rows, rows[0].keys() if rows else batch.keys())


class DraftStage(_LLMRole):
    """Samples one draft per seed from [D ; tokens(prefix)] (or, with `soft_prompt=False`, the
    no-soft-prompt baseline from the prefix text alone)."""

    role, output = "draft", "draft"
    columns = ("draft", "draft_tokens", "draft_finish_reason", "prompt_tokens", "draft_started_at")

    def __init__(self, *, soft_prompt: bool = True, baseline_prompt: str = "", few_shot: Optional[dict] = None,
                 end_at: str = "none", **kwargs: Any):
        super().__init__(**kwargs)
        if end_at not in END_AT:
            raise ValueError(f"synthesize.draft.end_at must be one of {END_AT}, got {end_at!r}")
        self.soft_prompt = soft_prompt
        self.baseline_prompt = baseline_prompt
        # the few-shot baseline ({"references", "k", "template", "run_seed"}): each seed's prompt is built
        # here from its seed index (fewshot.py), not shipped as a list that grows with N
        self.few_shot = few_shot
        self.end_at = end_at

    def prompt(self, row: dict) -> Optional[str]:
        if self.soft_prompt:
            return None
        if self.few_shot:
            f = self.few_shot
            return few_shot_prompt(f["template"], few_shot_examples(f["references"], f["k"], f["run_seed"],
                                                                    int(row["seed_index"])))
        return self.baseline_prompt

    def take(self, row: dict, answer: dict) -> None:
        row["draft"] = answer.get("draft")
        row["draft_tokens"] = answer.get("draft_tokens")  # tokens generated, the cut-off tail included
        row["draft_finish_reason"] = answer.get("draft_finish_reason")
        if self.end_at == "docstring" and row["draft"] is not None:
            row["draft"], row["draft_finish_reason"], _ = cut_draft(row["draft"], row["draft_finish_reason"])
        row["prompt_tokens"] = answer.get("draft_prompt_tokens")
        row["draft_started_at"] = answer.get("draft_started_at")  # the writer's started_at (steady rate)

    def verdict(self, row: dict, ran: bool) -> str:
        if not ran:
            return "not_run"
        if not (row.get("draft") or "").strip():
            return "empty"
        return "truncated" if row.get("draft_finish_reason") == "length" else "ok"


class RespondStage(_LLMRole):
    """An instruct model answers each accepted draft (`respond.prompt_template`)."""

    role, output, after = "respond", "response", "draft"
    inputs = ("draft", "draft_finish_reason")
    columns = ("response", "response_tokens", "response_prompt_tokens")

    def prompt(self, row: dict) -> str:
        return fill_template(self.options["template"], draft=row.get("draft") or "")

    def take(self, row: dict, answer: dict) -> None:
        row["response"] = answer.get("response")
        row["response_tokens"] = answer.get("response_tokens")
        row["response_prompt_tokens"] = answer.get("response_prompt_tokens")

    def verdict(self, row: dict, ran: bool) -> str:
        return "not_run" if not ran else ("empty" if not (row.get("response") or "").strip() else "ok")


class TestsStage(_LLMRole):
    """Self-written assert tests for each accepted draft (`respond.tests_template`); the top-level
    asserts of the answer's code block (`drafts.assert_tests`) become the `tests` column that the
    execute stage runs."""

    role, output, after = "tests", "tests_raw", "respond"
    inputs = ("draft", "draft_finish_reason", "response")
    columns = ("tests", "tests_tokens", "tests_prompt_tokens")

    def prompt(self, row: dict) -> str:
        return fill_template(self.options["template"], draft=row.get("draft") or "")

    def take(self, row: dict, answer: dict) -> None:
        row["tests"] = assert_tests(filters.extract_code(answer.get("tests_raw")))
        row["tests_tokens"] = answer.get("tests_raw_tokens")
        row["tests_prompt_tokens"] = answer.get("tests_raw_prompt_tokens")

    def verdict(self, row: dict, ran: bool) -> str:
        return "not_run" if not ran else ("empty" if not (row.get("tests") or "").strip() else "ok")


class JudgeStage(_LLMRole):
    """LLM grade of draft + response with the configured rubric.

    method `probability` (the config's default): the expected grade over the grade tokens 1..scale_max from one
    forward pass of `[rubric (chat template) ; answer_prefix]` (`judge.expected_grade`); `judge_raw`
    holds the grade distribution as JSON. method `text`: the judge writes an answer, parsed by
    `judge.parse_judge_score`.
    """

    role, output, after = "judge", "judge_raw", "respond"
    inputs = ("draft", "draft_finish_reason", "response")
    columns = ("judge_raw", "judge_score", "judge_error", "judge_tokens", "judge_prompt_tokens")

    def __init__(self, *, method: str = "text", answer_prefix: str = "Score: ", **kwargs: Any):
        # the plan passes judge.method (default probability); direct callers get the text judge they knew
        if method not in ("probability", "text"):
            raise ValueError(f"judge method {method!r}: use probability or text")
        # probability: next-token log-probabilities come from the batch engine (vllm.LLM or transformers)
        super().__init__(**kwargs, asynchronous=method == "text")
        self.method = method
        if method == "probability":
            tok = self.llm.engine.tokenizer
            self.grades = rubric_grades(self.options["scale_max"])
            self._prefix_ids, self._grade_ids = grade_token_ids(
                lambda text: list(tok(text, add_special_tokens=False)["input_ids"]), answer_prefix, self.grades)

    def prompt(self, row: dict) -> str:
        return fill_template(self.options["rubric"], draft=row.get("draft") or "", response=row.get("response") or "")

    def _answers(self, rows: list[dict]) -> list[dict]:
        if self.method == "text":
            return super()._answers(rows)
        import json

        from domino_ray.engines import GenerationRequest
        from domino_ray.synthesize.nexttoken import next_token_logprobs

        engine = self.llm.engine
        prompts = [engine.encode_request(GenerationRequest(text=self.prompt(r), chat=self.llm.chat)) + self._prefix_ids
                   for r in rows]
        fits = [i for i, p in enumerate(prompts) if len(p) < engine.max_model_len]
        with self.llm.engine_lock:  # several batches may be in this actor at once; the engine takes one
            logprobs = next_token_logprobs(engine, [prompts[i] for i in fits], self._grade_ids)
        answers = [{"judge_raw": "", "judge_score": None, "judge_raw_tokens": 0, "judge_raw_prompt_tokens": len(p),
                    "judge_error": f"judge prompt of {len(p)} tokens does not fit max_model_len={engine.max_model_len}"}
                   for p in prompts]
        for i, lp in zip(fits, logprobs):
            score, detail = expected_grade(lp, self.grades)
            answers[i].update(judge_raw=json.dumps({"method": "probability", **detail}), judge_score=score,
                              judge_error=None if score is not None else "no grade token among the judge's most "
                                                                         "likely next tokens")
        return answers

    def take(self, row: dict, answer: dict) -> None:
        raw = answer.get("judge_raw")
        if self.method == "probability":
            row["judge_score"], row["judge_error"] = answer.get("judge_score"), answer.get("judge_error")
        else:
            parsed = parse_judge_score(raw, self.options["scale_max"])
            row["judge_score"], row["judge_error"] = parsed.score, parsed.error
        row["judge_raw"] = raw if isinstance(raw, str) else ("" if raw is None else str(raw))
        row["judge_tokens"] = answer.get("judge_raw_tokens")
        row["judge_prompt_tokens"] = answer.get("judge_raw_prompt_tokens")

    def verdict(self, row: dict, ran: bool) -> str:
        return judge_verdict(row.get("judge_score"), self.rules.threshold) if ran else "not_run"


# --------------------------------------------------------------------------------------- execute
class ExecuteStage:
    """Runs the code of the response against its self-written tests for each still-accepted row
    with tests, on the assert path of `evaluate.verdict.judge_code_and_tests` (both are untrusted:
    `__main__` blocks removed, process-ending and hijacking constructs refused, a completion marker
    required after the last test). Rows without tests get `skipped` (no evidence either way),
    rejected rows stay null."""

    def __init__(self, *, sandbox_cfg: dict, run: str, rules: dict):
        from domino_ray.config import SandboxConfig
        from domino_ray.sandbox import ensure_isolation

        self.cfg = SandboxConfig.model_validate(sandbox_cfg)
        self.plan = ensure_isolation(self.cfg)  # strict refuses here, before any row
        self.rules = RejectRules(**rules)
        self.metrics = SynthMetrics(run)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from domino_ray.evaluate.verdict import judge_code_and_tests

        _require(self, batch, ("draft", "response", "tests"))
        rows = batch_to_rows(batch)
        for r in rows:
            r["exec_status"], r["exec_detail"] = None, None
            if first_failure(r, self.rules, upto="judge") is not None:
                continue
            code, tests = filters.extract_code(r.get("response")), (r.get("tests") or "").strip()
            if not tests or not code.strip():
                r["exec_status"], r["exec_detail"] = "skipped", "no tests" if not tests else "no code"
                continue
            # the statement's imports first (`from typing import List`), as a HumanEval completion runs after its prompt
            imports = statement_imports(r.get("draft"))
            verdict = judge_code_and_tests(f"{imports}\n{code}" if imports else code, tests, self.cfg)
            r["exec_status"], r["exec_detail"] = verdict.status, verdict.detail
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            counts[r["exec_status"] or "not_run"] += 1
        for verdict, n in counts.items():
            self.metrics.samples("execute", verdict, n)
        return rows_to_batch(rows, rows[0].keys() if rows else batch.keys())


# ---------------------------------------------------------------------------------------- filters
def load_decontamination_texts(specs: list[str], storage: Any = None) -> list[str]:
    """Prompts, tests, reference solutions and test inputs/outputs of every evaluation set in
    `filter.decontaminate`.

    A spec is anything `evaluate.benchmarks.load_benchmark` reads (`humaneval`, `humaneval:0:50`,
    `jsonl:PATH`, `evalplus:PATH`, `livecodebench:PATH`, local or s3://); a bare `*.jsonl[.gz]` path is
    read as `jsonl:PATH`.
    """
    from domino_ray.evaluate.benchmarks import KNOWN_BENCHMARKS, load_benchmark

    texts = []
    for spec in specs:
        if spec.endswith((".jsonl", ".jsonl.gz")) and spec.split(":", 1)[0] not in KNOWN_BENCHMARKS:
            spec = f"jsonl:{spec}"
        for p in load_benchmark(spec, storage):
            texts.extend(t for t in (p.prompt, p.tests, p.canonical_solution) if t)
            # io pairs hold strings or JSON values (LeetCode-style calls): their text is what could leak
            texts.extend("\n".join(str(v) for v in io.values()) for io in (p.io_tests or []) if isinstance(io, dict))
    return texts


class RowFilterStage:
    """The per-row checks of the filter stage: syntax, decontamination, novelty, and the dedup keys
    (exact hash and MinHash of the draft) that the final pass clusters. Each actor loads the
    evaluation n-grams and the reference index once."""

    def __init__(self, *, filter_cfg: dict, run: str, respond_enabled: bool, references: Optional[dict] = None,
                 s3_cfg: Optional[dict] = None):
        self.cfg = filter_cfg
        self.respond_enabled = respond_enabled
        self.metrics = SynthMetrics(run)
        self.decontam = None
        if filter_cfg["decontaminate"]:
            texts = load_decontamination_texts(filter_cfg["decontaminate"], _storage(s3_cfg))
            self.decontam = filters.build_ngram_index(texts, filter_cfg["decontam_ngram"])
        self.novelty = None
        if filter_cfg["novelty"] and references:
            from domino_ray.references import read_reference_texts

            texts = [t for t, _ in read_reference_texts(references["source"], references["text_field"], _storage(s3_cfg))]
            self.novelty = filters.build_novelty_index(texts, filter_cfg["novelty_ngram"])

    def _syntax(self, row: dict) -> Optional[bool]:
        target = row.get("response") if self.respond_enabled else row.get("draft")
        if not self.cfg["syntax"] or target is None:
            return None
        ok = filters.check_syntax(filters.extract_code(target))
        if ok and row.get("tests"):
            ok = filters.check_syntax(row["tests"])
        return ok

    def check(self, row: dict) -> dict:
        draft = row.get("draft")
        has_draft = isinstance(draft, str) and bool(draft.strip())
        row["syntax_ok"] = self._syntax(row)
        row["contaminated"] = self.decontam.contaminated(draft) if self.decontam and has_draft else None
        row["novel"] = row["novelty_overlap"] = None
        if self.novelty is not None and has_draft:
            row["novelty_overlap"], row["novel"] = self.novelty.verdict(draft, self.cfg["novelty_max_overlap"])
        row["dedup_key"] = row["minhash"] = None
        if self.cfg["dedup"] and has_draft:
            row["dedup_key"] = filters.exact_key(draft)
            row["minhash"] = filters.minhash_signature(draft, self.cfg["num_perm"], self.cfg["shingle_size"])
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _require(self, batch, ("draft",))
        rows = [self.check(r) for r in batch_to_rows(batch)]
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            if r["syntax_ok"] is not None:
                counts["syntax_ok" if r["syntax_ok"] else "syntax_error"] += 1
            if r["contaminated"]:
                counts["contaminated"] += 1
            if r["novel"] is False:
                counts["not_novel"] += 1
        for verdict, n in counts.items():
            self.metrics.samples("filter", verdict, n)
        return rows_to_batch(rows, rows[0].keys() if rows else batch.keys())


# ----------------------------------------------------------------------------------------- writer
class BlockWriter:
    """Collects rows by seed block and writes each block as one work object the moment its last row
    arrives; returns one small row per written block (the driver's progress).

    Runs as a single actor so that every row of a block meets in one place. The plan hands it one
    seed block per call (blocks.task_groups), so between calls it normally holds nothing and a
    restarted writer loses nothing; a block that arrives in pieces waits in `pending`, which Ray
    Data's backpressure bounds, never the whole dataset.

    Each output row also says how many seed blocks the completing call held (`call_blocks`) and in
    how many calls the block arrived (`calls`): the driver reports both, and a plan that merged or
    split blocks shows there. `started_at` is when the draft engine began the block (NaN when the
    rows carry no `draft_started_at`); the driver's steady-state rate starts at the earliest one.
    """

    def __init__(self, *, work_uri: str, num_samples: int, block_size: int, s3_cfg: Optional[dict],
                 constants: dict, rules: dict):
        self.work_uri = work_uri
        self.num_samples, self.block_size = num_samples, block_size
        self.storage = _storage(s3_cfg)
        self.constants = constants
        self.rules = RejectRules(**rules)
        self.pending: dict[int, list[dict]] = defaultdict(list)
        self.pieces: dict[int, int] = defaultdict(int)  # calls that brought rows of a pending block
        self.started: dict[int, float] = {}  # the earliest draft call that brought rows of a pending block
        self.metrics = SynthMetrics(constants["run"])

    def _finish_row(self, row: dict, created_at) -> dict:
        row.update(self.constants)
        row["id"] = schema.sample_id(self.constants["run"], int(row["seed_index"]))
        row["created_at"] = created_at
        row["duplicate_of"] = None  # decided by the final pass, which sees every block
        row["reject_reason"] = first_failure(row, self.rules)
        row["accepted"] = row["reject_reason"] is None
        return row

    def _write(self, block: int, rows: list[dict]) -> dict:
        rows.sort(key=lambda r: r["seed_index"])
        created_at = utc_now()
        table = rows_to_table([self._finish_row(r, created_at) for r in rows], schema.SYNTH_WORK_SCHEMA)
        from domino_ray.storage import join_uri

        write_table(self.storage, join_uri(self.work_uri, blocks.block_name(block)), table)
        self.metrics.samples("write", "rows", len(rows))
        return {"block": block, "rows": len(rows), "accepted": sum(1 for r in rows if r["accepted"])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _require(self, batch, ("seed_index", "block"))
        written = []
        rows = batch_to_rows(batch)
        here = sorted({int(r["block"]) for r in rows})
        for block in here:
            self.pieces[block] += 1
        for row in rows:
            block = int(row["block"])
            self.pending[block].append(row)
            started = row.get("draft_started_at")
            self.started[block] = np.fmin(self.started.get(block, np.nan), np.nan if started is None else float(started))
            if len(self.pending[block]) == len(blocks.block_seeds(block, self.num_samples, self.block_size)):
                written.append({**self._write(block, self.pending.pop(block)), "calls": self.pieces.pop(block),
                                "call_blocks": len(here), "started_at": self.started.pop(block)})
        out = {k: np.asarray([w[k] for w in written], dtype=np.int64)
               for k in ("block", "rows", "accepted", "calls", "call_blocks")}
        out["started_at"] = np.asarray([w["started_at"] for w in written], dtype=np.float64)
        return out
