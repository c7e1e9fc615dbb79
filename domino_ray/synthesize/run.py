"""`domino synthesize`: the Ray Data plan from seed indices to record Parquet (DESIGN.md sections 2, 4, 5).

Layout under the run root:
    synth/manifest.json           fingerprint, config, versions, counts, tokens, timings
    synth/work/part-NNNNNN.parquet one per finished seed block (SYNTH_WORK_SCHEMA), written while streaming
    synth/records/part-NNNNNN.parquet the records (RECORD_SCHEMA), written by the final pass

Phase 1 (streaming, Ray Data): block ids of the blocks not yet in synth/work -> one row per seed ->
draft -> respond -> tests -> judge (LLM actor pools) -> execute (sandbox actors) -> per-row filters
(filter actors) -> BlockWriter (one actor; writes a block the moment its last row arrives). The
driver only reads one small row per written block, so its memory does not grow with N.

The seed block is the unit of work (docs/synthesis.md): one Ray Data block, hence one task of every
stage, per seed block (`blocks.task_groups`), so memory per task, the wait for the first written block
and the work lost on a kill are bounded by block_size whatever N is. A killed job restarted with the
same config checks synth/work (an empty, unreadable or wrong-seeded object is deleted and generated
again), skips the finished blocks and redoes only the rest. A larger num_samples extends: only the new
blocks (and a remainder block that grew) are generated. Up to synthesize.max_errored_blocks failed
blocks are tolerated: the others are written, the run ends "incomplete" and a re-run finishes them.

Phase 2 (`finalize.finalize_blocks`, Ray Data operations driven from one small Ray task): global
dedup (MinHash LSH bands grouped by key, candidate pairs verified, resolved in seed order over the
match graph only), final verdicts, counts, synth/records written by one task per few blocks. No task
holds state that grows with N.

Config fingerprint: the sections that change generated content (run name and seed, backbone,
references, synthesize without actor-pool sizes and without the verdict-only settings, sandbox when
execute is on, the representation's sha256). An existing output made with another fingerprint is
refused unless `overwrite`. The verdict-only settings (`verdict_parts`: filter thresholds and sets,
the judge threshold while execute is off) re-finalize instead: synth/records is rewritten from
synth/work, nothing is generated.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from domino_ray.config import DominoConfig
from domino_ray.layout import REPRESENTATION_META, RunLayout
from domino_ray.manifest import RunManifest, config_fingerprint, package_versions, redact_secrets
from domino_ray.runlock import holds_run_root
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks
from domino_ray.synthesize.verdicts import RejectRules

__all__ = ["run_synthesize", "SynthesisConflict", "SynthesisIncomplete", "synthesis_fingerprint", "SynthPaths",
           "check_work_blocks", "verdict_parts", "verdict_state"]

log = logging.getLogger(__name__)


class SynthesisConflict(ValueError):
    """The output already holds records made with a different config (use --overwrite)."""


class SynthesisIncomplete(RuntimeError):
    """Some blocks failed (within synthesize.max_errored_blocks); the rest are written. Re-run to finish."""


@dataclass(frozen=True)
class SynthPaths:
    """synth/ of a run root, as `layout.RunLayout` names it."""

    root: str

    @property
    def synth(self) -> str:
        return RunLayout(self.root).synth

    @property
    def work(self) -> str:
        return RunLayout(self.root).synth_work

    @property
    def records(self) -> str:
        return RunLayout(self.root).synth_records

    @property
    def manifest(self) -> str:
        return RunLayout(self.root).synth_manifest


# ----------------------------------------------------------------------------------- fingerprint
_SCHEDULING = ("pool", "fit_cpus", "cluster_can_grow", "resource_wait_s")  # where and when, not what
# how many, and how failures are tolerated, not what a record holds
_NOT_REGENERATING = ("num_samples", "max_errored_blocks")


def _without_pools(section: Any) -> Any:
    """Actor-pool sizes change speed, not records: a restart with more actors must still resume."""
    if isinstance(section, dict):
        return {k: _without_pools(v) for k, v in section.items() if k not in _SCHEDULING}
    return section


# Settings that only change verdicts, read by the final pass from what synth/work already holds
# (section, key). Changing only these re-finalizes (synth/records rewritten, synth/work untouched).
# The judge threshold is one only while execute is off: execution runs on the rows that pass the judge,
# so a lower threshold would let rows through whose tests never ran.
_VERDICT_ONLY = (("filter", "dedup_threshold"), ("filter", "decontaminate"), ("filter", "decontam_ngram"),
                 ("filter", "novelty"), ("filter", "novelty_ngram"), ("filter", "novelty_max_overlap"))
_VERDICT_ONLY_WITHOUT_EXECUTE = (("judge", "threshold"),)


def _verdict_keys(cfg: DominoConfig) -> tuple[tuple[str, str], ...]:
    return _VERDICT_ONLY + (() if cfg.synthesize.execute.enabled else _VERDICT_ONLY_WITHOUT_EXECUTE)


def fingerprint_parts(cfg: DominoConfig, representation_sha256: Optional[str]) -> dict[str, Any]:
    """(a) What changes generated content: a difference means synth/work must be generated again."""
    synth = {k: v for k, v in _without_pools(cfg.section_dict("synthesize")).items() if k not in _NOT_REGENERATING}
    for section, key in _verdict_keys(cfg):
        synth[section] = {k: v for k, v in synth[section].items() if k != key}
    parts = {
        "run": {"name": cfg.run.name, "seed": cfg.run.seed},
        "backbone": {k: cfg.section_dict("backbone")[k] for k in ("model", "dtype", "trust_remote_code")},
        "references": cfg.section_dict("references"),
        # num_samples is not here: a larger N extends the run (only the new blocks are generated; each
        # sample depends on its own seed index only), a smaller one drops records (E2, docs/synthesis.md)
        "synthesize": synth,
        "representation_sha256": representation_sha256,
    }
    if cfg.synthesize.execute.enabled:
        parts["sandbox"] = _without_pools(cfg.section_dict("sandbox"))
    return parts


def verdict_parts(cfg: DominoConfig) -> dict[str, Any]:
    """(b) What only changes verdicts (filter thresholds and sets, the judge threshold without
    execute): a difference re-finalizes from synth/work without generating anything."""
    synth = cfg.section_dict("synthesize")
    return {f"{section}.{key}": synth[section][key] for section, key in _verdict_keys(cfg)}


def synthesis_fingerprint(cfg: DominoConfig, representation_sha256: Optional[str]) -> tuple[str, dict[str, Any]]:
    parts = fingerprint_parts(cfg, representation_sha256)
    return config_fingerprint(parts), parts


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


# --------------------------------------------------------------------------------- preparation
@dataclass
class _Inputs:
    representation_uri: Optional[str]
    representation_sha256: Optional[str]
    backbone: str
    prefix: str
    baseline_prompt: str
    # few-shot baseline: {"references", "k", "template", "run_seed"}; the draft actors build each seed's
    # prompt from it (fewshot.py), so nothing here grows with N; None = baseline_prompt for every seed
    few_shot: Optional[dict] = None
    draft_max_tokens: Optional[int] = None  # resolved synthesize.draft.sampling.max_tokens


DEFAULT_DRAFT_MAX_TOKENS = 256  # when no length is set and none could be derived from the references


def draft_max_tokens(lengths: list[int], quantile: float = 0.95, factor: float = 1.25) -> int:
    """The default draft length: `factor` x the nearest-rank `quantile` of the reference lengths."""
    if not lengths:
        raise ValueError("no references to derive synthesize.draft.sampling.max_tokens from; set it")
    ordered = sorted(lengths)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return math.ceil(ordered[rank - 1] * factor)


def _resolve_draft_length(cfg: DominoConfig, storage: Storage, inputs: "_Inputs") -> "_Inputs":
    """Fill `draft_max_tokens`: the configured value, else derived from the references' token lengths
    in the draft model's tokenizer (EOS included), logged."""
    from dataclasses import replace

    set_value = cfg.synthesize.draft.sampling.max_tokens
    if set_value is not None:
        return replace(inputs, draft_max_tokens=set_value)
    from domino_ray.backbone import load_tokenizer
    from domino_ray.references import load_references

    tok = load_tokenizer(_draft_model(cfg), cfg.backbone.trust_remote_code)
    lengths = [len(ids) for ids in load_references(cfg.references, tok, storage).token_ids]
    value = draft_max_tokens(lengths)
    log.info("synthesize: draft max_tokens %d = 1.25 x the 95th percentile of %d reference lengths "
             "(synthesize.draft.sampling.max_tokens is null)", value, len(lengths))
    return replace(inputs, draft_max_tokens=value)


def _check_few_shot_length(cfg: DominoConfig, inputs: "_Inputs") -> None:
    """Refuse, on the driver, few-shot prompts that cannot fit the draft engine with a whole draft."""
    if not inputs.few_shot:
        return
    from domino_ray.backbone import load_tokenizer
    from domino_ray.synthesize.fewshot import check_few_shot_fits

    draft = cfg.synthesize.draft
    f = inputs.few_shot
    check_few_shot_fits(load_tokenizer(_draft_model(cfg), cfg.backbone.trust_remote_code), f["references"], f["k"],
                        f["template"], draft.engine.chat_template,
                        inputs.draft_max_tokens or draft.sampling.max_tokens or DEFAULT_DRAFT_MAX_TOKENS,
                        draft.engine.max_model_len)


def _draft_model(cfg: DominoConfig) -> str:
    return cfg.synthesize.draft.engine.model or cfg.backbone.model


def _prepare_inputs(cfg: DominoConfig, storage: Storage) -> _Inputs:
    """Find and check the representation on the driver, before any actor starts: a missing or
    mismatched D must fail in seconds with the fix, not after every actor has loaded a model."""
    model = _draft_model(cfg)
    if not cfg.synthesize.draft.enabled:
        from domino_ray.backbone import load_tokenizer

        tok = load_tokenizer(model, cfg.backbone.trust_remote_code)
        # the baseline needs at least one prompt token: the prefix, else the BOS (or EOS) token
        baseline = cfg.references.prefix or tok.bos_token or tok.eos_token
        few_shot = None
        if cfg.synthesize.draft.few_shot:
            from domino_ray.references import read_reference_split
            from domino_ray.synthesize.fewshot import few_shot_examples

            train, _ = read_reference_split(cfg.references, storage)  # never the held-out samples
            few_shot_examples(train, cfg.synthesize.draft.few_shot, cfg.run.seed, 0)  # no references: fail here
            few_shot = {"references": list(train), "k": cfg.synthesize.draft.few_shot,
                        "template": cfg.synthesize.draft.few_shot_template, "run_seed": cfg.run.seed}
        return _Inputs(None, None, model, "", baseline, few_shot)  # the prefix is already the whole prompt
    from transformers import AutoConfig

    from domino_ray.representation import check_compatible, load_representation

    root = cfg.run.output
    layout = RunLayout(root)
    # representation.json directly under the run root: the layout before representation/ existed
    if not (storage.exists(layout.representation_meta) or storage.exists(join_uri(root, REPRESENTATION_META))):
        raise FileNotFoundError(
            f"no representation under {layout.representation}: run `domino learn --config CFG` first "
            f"(same run.output), or set synthesize.draft.enabled: false for the no-soft-prompt baseline")
    rep = load_representation(root, storage)
    try:
        model_config = AutoConfig.from_pretrained(model, trust_remote_code=cfg.backbone.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"synthesize.draft.engine.model / backbone.model {model!r}: cannot read its config ({e})") from e
    check_compatible(rep, model_config, model, allow_other_weights=cfg.synthesize.draft.engine.allow_other_weights)
    if cfg.references.prefix != rep.prefix:
        log.warning("references.prefix %r differs from the prefix D was trained with (%r); generation uses the "
                    "representation's, since training and generation must agree", cfg.references.prefix, rep.prefix)
    return _Inputs(rep.uri or root, rep.sha256, model, rep.prefix, "")


def _check_filter_inputs(cfg: DominoConfig, storage: Storage) -> None:
    """Read the evaluation sets and references once on the driver, so a bad path fails here with the
    file named, not later inside every filter actor's constructor."""
    filt = cfg.synthesize.filter
    if not filt.enabled:
        return
    from domino_ray.synthesize.stages import load_decontamination_texts

    try:
        load_decontamination_texts(filt.decontaminate, storage)
    except (OSError, ValueError) as e:
        raise ValueError(f"synthesize.filter.decontaminate {filt.decontaminate}: {e}") from e
    if filt.novelty:
        from domino_ray.references import read_reference_texts

        read_reference_texts(cfg.references.source, cfg.references.text_field, storage)


def _claim_output(storage: Storage, paths: SynthPaths, fingerprint: str, parts: dict, overwrite: bool) -> Optional[dict]:
    """Resume (same fingerprint), refuse (different) or wipe (overwrite). Returns the old manifest."""
    old = storage.read_json(paths.manifest) if storage.exists(paths.manifest) else None
    leftovers = storage.list_files(paths.synth)
    if old is not None and old.get("fingerprint") == fingerprint:
        return old
    if old is None and not leftovers:
        return None
    if not overwrite:
        if old is None:
            why = f"{len(leftovers)} files under {paths.synth} but no synth/manifest.json"
        else:
            diffs = _differences(old.get("fingerprint_parts", {}), parts)
            why = "config differs: " + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
        raise SynthesisConflict(f"{paths.synth} holds records of another synthesis config ({why}). Pass --overwrite "
                                f"(run_synthesize(..., overwrite=True)) to replace them, or use another run.output")
    log.warning("overwrite: deleting %d files under %s", len(leftovers), paths.synth)
    for uri in leftovers:
        storage.delete(uri)
    return None


def _work_seeds(storage: Storage, uri: str) -> list[int]:
    """The seed indices a work object holds. Reads the footer and one column (a few KiB, not the
    object); a file that does not parse is read whole once more, so that an unreachable store raises
    StorageError (nothing deleted) while a corrupt object raises ValueError."""
    import io

    import pyarrow.parquet as pq

    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=["seed_index"]).column(0).to_pylist()
    except Exception:  # noqa: BLE001 - decided below, on the whole object
        data = storage.read_bytes(uri)  # StorageError when the store itself is the problem
    if not data:
        raise ValueError("empty (0 bytes)")
    try:
        return pq.ParquetFile(io.BytesIO(data)).read(columns=["seed_index"]).column(0).to_pylist()
    except Exception as e:  # noqa: BLE001 - any parse failure of bytes we hold is a corrupt object
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e


def check_work_blocks(storage: Storage, paths: SynthPaths, num_samples: int, block_size: int,
                      threads: int = 16) -> dict[str, Any]:
    """Check the work objects of a run being resumed or extended; return what is left to generate.

    A work object that is empty, unreadable or does not hold exactly its block's seeds (a remainder
    block of a smaller num_samples, an object cut short) is deleted, logged with its URI, and its
    block generated again: never fatal, and a good object is never touched. Objects of blocks past
    N (after num_samples shrank) are kept for a later extension and ignored. Record objects are
    derived from the work blocks by the final pass, which rewrites the missing ones: those from the
    first block to generate on, and those past N, are deleted so that synth/records only ever holds
    records of the current work set (a regenerated block may change the dedup verdicts after it).
    """
    total = blocks.num_blocks(num_samples, block_size)
    found = {b: uri for uri in storage.list_files(paths.work, suffix=".parquet")
             if (b := blocks.parse_block_name(uri)) is not None}
    inside = sorted((b, uri) for b, uri in found.items() if b < total)

    def verdict(item: tuple[int, str]) -> Optional[str]:
        b, uri = item
        try:
            got = sorted(_work_seeds(storage, uri))
        except ValueError as e:
            return str(e)
        expected = blocks.block_seeds(b, num_samples, block_size)
        if got != list(expected):
            where = f"{got[0]}..{got[-1]}" if got else "none"
            return f"holds {len(got)} seeds ({where}), block {b} of N={num_samples} is {len(expected)} " \
                   f"({expected[0]}..{expected[-1]})"
        return None

    with ThreadPoolExecutor(max(1, min(threads, len(inside)))) as pool:
        verdicts = list(pool.map(verdict, inside))
    bad = [(b, uri, why) for (b, uri), why in zip(inside, verdicts) if why]
    for b, uri, why in bad:
        log.warning("synthesize: work object %s %s: deleted, block %d is generated again", uri, why, b)
        storage.delete(uri)
    good = {b for (b, _), why in zip(inside, verdicts) if not why}
    todo = [b for b in range(total) if b not in good]
    beyond = sorted(b for b in found if b >= total)
    if beyond:
        log.info("synthesize: %d work blocks past num_samples=%d (blocks %d..%d) kept for a later extension, "
                 "not part of this run's records", len(beyond), num_samples, beyond[0], beyond[-1])
    stale_from = min(todo, default=total)
    stale = [uri for uri in storage.list_files(paths.records, suffix=".parquet")
             if (b := blocks.parse_block_name(uri)) is not None and b >= stale_from]
    if stale:
        log.info("synthesize: %d record objects from block %d on deleted; the final pass writes them again",
                 len(stale), stale_from)
    for uri in stale:
        storage.delete(uri)
    return {"todo": todo, "regenerated": [b for b, _, _ in bad], "beyond": len(beyond),
            "records_deleted": len(stale)}


# ------------------------------------------------------------------------------------- the plan
# A task whose actor died is retried this many times on a restarted actor (Ray Data restarts actors
# without limit); a block that keeps killing its engine then fails like any other errored block,
# counted against synthesize.max_errored_blocks, instead of being retried forever.
# (Passed as a plain Ray remote argument: Ray 2.60 warns that those go in 2.64 and has no named
# parameter for it yet; without it Ray Data's default is to retry without limit.)
ACTOR_TASK_RETRIES = 3
SEED_MAP_MEMORY = 256 * 1024**2


def rows_per_call(pool, block_size: int) -> int:
    """A pool's rows per UDF call: its batch_size, at most one seed block. Ray Data bundles a task's
    input up to batch_size rows, so a larger batch_size would put several seed blocks in one task."""
    return min(pool.batch_size, block_size)


def _pool_args(pool, num_cpus: Optional[float] = None, block_size: Optional[int] = None) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    args: dict[str, Any] = {"batch_size": pool.batch_size if block_size is None else rows_per_call(pool, block_size),
                            "num_cpus": pool.num_cpus if num_cpus is None else num_cpus,
                            "compute": ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
                            "max_restarts": -1, "max_task_retries": ACTOR_TASK_RETRIES}
    if pool.num_gpus:
        args["num_gpus"] = pool.num_gpus
    return args


def _largest_call(cfg: DominoConfig) -> int:
    """The most rows any enabled pool takes per call (blocks.task_groups' min_rows)."""
    syn = cfg.synthesize
    pools = [syn.draft.pool]
    pools += [syn.respond.pool] if syn.respond.enabled else []
    pools += [syn.judge.pool] if syn.judge.enabled else []
    pools += [syn.execute.pool] if syn.execute.enabled else []
    pools += [syn.filter.pool] if syn.filter.enabled else []
    return max(rows_per_call(p, syn.block_size) for p in pools)


def plan_groups(cfg: DominoConfig, todo: list[int]) -> list[list[int]]:
    """The seed blocks of each task (blocks.task_groups for this config's pools)."""
    return blocks.task_groups(todo, cfg.synthesize.num_samples, cfg.synthesize.block_size, _largest_call(cfg))


def build_synthesis_plan(cfg: DominoConfig, todo: list[int], inputs: _Inputs, paths: SynthPaths, plan=None):
    """The lazy Ray Data plan over the block ids in `todo` (DESIGN section 2's diagram, in code).
    `plan` (a resources.ResourcePlan) gives each pool the CPUs to request; default: as configured."""
    import ray
    from ray.data import ActorPoolStrategy

    from domino_ray.engines.stage import with_batches_in_flight
    from domino_ray.synthesize import stages
    from domino_ray.synthesize.resources import cpus_for

    syn = cfg.synthesize
    rules = vars(RejectRules.from_config(syn))
    s3 = cfg.storage.s3.model_dump()
    backbone = cfg.section_dict("backbone")
    common = {"backbone_cfg": backbone, "run": cfg.run.name, "rules": rules, "storage_cfg": s3}

    # from_items, not ray.data.range: a read task holds a whole CPU while backpressured, and on a
    # 2-CPU node that starves the actor pools forever. The list is one small dict per missing block,
    # and each is its own Ray Data block: one seed block per task in every stage (blocks.task_groups).
    groups = plan_groups(cfg, todo)
    ds = ray.data.from_items([{"ids": g} for g in groups], override_num_blocks=max(1, len(groups)))
    ctx = ds.context  # this dataset's copy (from_items copies the current one); the maps below inherit it
    ctx.max_errored_blocks = syn.max_errored_blocks
    # never cut a task's output into several Ray Data blocks (128 MiB by default): a piece smaller
    # than the next stage's batch_size would be bundled with another seed block's rows
    ctx.target_max_block_size = None
    # A memory request (256 MiB: a worker with Ray and numpy loaded is ~110 MiB; the rows it makes are
    # ~50 bytes per seed) also keeps this map out of operator fusion: fused into a draft pool of equal num_cpus, the fused task would bundle
    # batch_size one-row id blocks, i.e. several seed blocks per task. The pools never set memory.
    ds = ds.map_batches(stages.expand_blocks, batch_size=None, num_cpus=0.1, memory=SEED_MAP_MEMORY,
                        fn_kwargs={"num_samples": syn.num_samples, "block_size": syn.block_size, "run_seed": cfg.run.seed})

    def llm(ds, cls, stage_cfg, **extra):
        kwargs = {**common, "engine_cfg": stage_cfg.engine.model_dump(), "sampling": stage_cfg.sampling.model_dump(), **extra}
        args = _pool_args(stage_cfg.pool, cpus_for(plan, cls.role, stage_cfg.pool.num_cpus), syn.block_size)
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_format="numpy",
                              **with_batches_in_flight(args, stage_cfg.pool))  # several batches per actor

    draft_sampling = {**syn.draft.sampling.model_dump(),
                      "max_tokens": inputs.draft_max_tokens or syn.draft.sampling.max_tokens or DEFAULT_DRAFT_MAX_TOKENS}
    ds = llm(ds, stages.DraftStage, syn.draft, sampling=draft_sampling, soft_prompt=syn.draft.enabled,
             representation_uri=inputs.representation_uri, prefix=inputs.prefix, baseline_prompt=inputs.baseline_prompt,
             few_shot=inputs.few_shot, end_at=syn.draft.end_at)
    if syn.respond.enabled:
        ds = llm(ds, stages.RespondStage, syn.respond, template=syn.respond.prompt_template)
        if syn.respond.write_tests:
            ds = llm(ds, stages.TestsStage, syn.respond, template=syn.respond.tests_template)
    if syn.judge.enabled:
        ds = llm(ds, stages.JudgeStage, syn.judge, rubric=syn.judge.rubric, scale_max=syn.judge.scale_max,
                 method=syn.judge.method, answer_prefix=syn.judge.answer_prefix)
    if syn.execute.enabled:
        from domino_ray.remote import sandbox_remote_args  # untrusted code: sandbox-capable nodes only

        ds = ds.map_batches(stages.ExecuteStage, batch_format="numpy",
                            **_pool_args(syn.execute.pool, cpus_for(plan, "execute", syn.execute.pool.num_cpus),
                                         syn.block_size),
                            **sandbox_remote_args(syn.execute.pool),
                            fn_constructor_kwargs={"sandbox_cfg": cfg.section_dict("sandbox"), "run": cfg.run.name,
                                                   "rules": rules})
    if syn.filter.enabled:
        ds = ds.map_batches(stages.RowFilterStage, batch_format="numpy",
                            **_pool_args(syn.filter.pool, cpus_for(plan, "filter", syn.filter.pool.num_cpus),
                                         syn.block_size),
                            fn_constructor_kwargs={"filter_cfg": syn.filter.model_dump(), "run": cfg.run.name,
                                                   "respond_enabled": syn.respond.enabled,
                                                   "references": cfg.section_dict("references") if syn.filter.novelty else None,
                                                   "s3_cfg": s3})
    constants = {"run": cfg.run.name, "backbone": inputs.backbone, "representation_sha256": inputs.representation_sha256,
                 "temperature": syn.draft.sampling.temperature, "top_p": syn.draft.sampling.top_p}
    # one writer actor: every row of a block must meet in one place to be written as one object;
    # batch_size=None: one call per upstream block, i.e. per seed block
    return ds.map_batches(stages.BlockWriter, batch_size=None, batch_format="numpy", num_cpus=0.1,
                          compute=ActorPoolStrategy(size=1), max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES,
                          fn_constructor_kwargs={"work_uri": paths.work, "num_samples": syn.num_samples,
                                                 "block_size": syn.block_size, "s3_cfg": s3, "constants": constants,
                                                 "rules": rules})


def _resource_plan(cfg: DominoConfig):
    """Add the pools up against the cluster before any actor starts (synthesize/resources.py): run,
    fit the CPUs, wait for an autoscaler (with a deadline) or refuse with the arithmetic."""
    import os

    import ray

    from domino_ray.synthesize.resources import ResourceShortage, plan_resources, pool_needs

    syn = cfg.synthesize
    can_grow = syn.cluster_can_grow == "yes" or (syn.cluster_can_grow == "auto" and bool(os.environ.get("RAY_ADDRESS")))
    needs = pool_needs(syn)
    deadline = time.time() + syn.resource_wait_s
    while True:
        have = ray.cluster_resources()
        plan = plan_resources(needs, have.get("CPU", 0.0), have.get("GPU", 0.0), can_grow, syn.fit_cpus)
        if plan.action == "ok":
            log.info("%s", plan.message)
            return plan
        if plan.action == "fit":
            log.warning("%s", plan.message)
            return plan
        left = deadline - time.time()
        if left <= 0:
            raise ResourceShortage(f"{plan.message}; gave up after {syn.resource_wait_s:g} s "
                                   f"(synthesize.resource_wait_s). Lower the pools' min_actors or add nodes")
        log.warning("%s; %.0f s left before giving up (synthesize.resource_wait_s)", plan.message, left)
        time.sleep(min(10.0, left))


def _stream(ds, todo: list[int], total_blocks: int, groups: list[list[int]]) -> dict[str, Any]:
    """Run the plan; the driver sees one row per written block (progress, counts).

    Blocks whose tasks failed within synthesize.max_errored_blocks are simply not written: they are
    returned as `missing` (the caller ends the run incomplete). The writer's `call_blocks` and
    `calls` show whether each seed block travelled as one unit: `calls` 1, and `call_blocks` the size
    of its planned group (`groups`); more is an unplanned merge, counted and warned about."""
    import numpy as np
    from tqdm import tqdm

    t0 = time.time()
    rows = accepted = done = 0
    written: set[int] = set()
    planned = {b: len(g) for g in groups for b in g}
    max_call_blocks = max_calls = unplanned = 0
    first: Optional[float] = None  # when the first block was written
    began = float("nan")  # when the first draft engine began generating (the earliest block's started_at)
    with tqdm(total=len(todo), desc="synthesize blocks", unit="block") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for block, n, ok, calls, call_blocks, started in zip(*(batch[k].tolist() for k in (
                    "block", "rows", "accepted", "calls", "call_blocks", "started_at"))):
                rows, accepted, done = rows + n, accepted + ok, done + 1
                began = float(np.fmin(began, started))  # NaN (a block without draft timing) is skipped
                written.add(int(block))
                max_call_blocks, max_calls = max(max_call_blocks, call_blocks), max(max_calls, calls)
                if call_blocks > planned.get(int(block), 1):
                    unplanned += 1
                    log.warning("synthesize: block %d reached the writer with %d other seed blocks in one task "
                                "(planned: %d); memory and lost work per task grow", block, call_blocks - 1,
                                planned.get(int(block), 1) - 1)
                first = first or time.time()
                bar.update(1)
                log.info("synthesize: block %d written (%d rows, %d pass the per-row checks); %d/%d blocks this run, "
                         "%d/%d overall", block, n, ok, done, len(todo), total_blocks - len(todo) + done, total_blocks)
    end = time.time()
    seconds = end - t0
    missing = [b for b in todo if b not in written]
    return {"blocks": done, "rows": rows, "seconds": round(seconds, 3), "missing": missing,
            "first_block_seconds": round(first - t0, 3) if first else None,
            "generation_start_seconds": None if math.isnan(began) else round(began - t0, 3),
            "generation_window": None if math.isnan(began) else [round(began, 3), round(end, 3)],
            "max_blocks_per_write_call": max_call_blocks, "max_calls_per_block": max_calls, "unplanned_merges": unplanned,
            "samples_per_second": round(rows / seconds, 3) if seconds > 0 and rows else None,
            "steady_samples_per_second": steady_rate(rows, began, end)}


def steady_rate(rows: int, began: float, end: float) -> Optional[float]:
    """Rows per second from the moment the first draft engine began generating (`began`, NaN when
    unknown) to the end: the run's rate without actor start-up (engines load in tens of seconds).

    Measured from the engine's first call, not from the first written block: with several batches
    in flight the first blocks land together, and a clock started at the first of them would count
    their companions' rows without the time spent on them (x1.25 too fast at 4 in flight, 16 blocks)."""
    if not rows or math.isnan(began) or end <= began:
        return None
    return round(rows / (end - began), 3)


def _finalize_remote(kwargs: dict) -> dict:
    from domino_ray.synthesize.finalize import finalize_blocks

    return finalize_blocks(**kwargs)


# the verdict-only settings that the final pass cannot apply from stored columns alone: contamination
# and novelty are recomputed from the stored drafts when they differ from the work blocks' settings
_RECHECKED = ("filter.decontaminate", "filter.decontam_ngram", "filter.novelty", "filter.novelty_ngram",
              "filter.novelty_max_overlap")


def verdict_state(cfg: DominoConfig, old: Optional[dict]) -> dict[str, Any]:
    """The manifest's record of verdict settings: `verdict_parts` (this config), `work_verdict_parts`
    (those synth/work's per-row columns were computed with, kept from the first generation on) and
    `records_verdict_parts` (those of the records on disk; set only when a final pass completes, so a
    re-filter killed half-way is redone whole)."""
    now = verdict_parts(cfg)
    old = old or {}
    records = old.get("records_verdict_parts")
    # records of other settings are about to be rewritten: until that pass completes they are unknown
    return {"verdict_parts": now, "work_verdict_parts": old.get("work_verdict_parts") or now,
            "records_verdict_parts": records if records == now else None}


def _finalize(cfg: DominoConfig, paths: SynthPaths, old: Optional[dict] = None) -> dict[str, Any]:
    """The final pass (finalize.py), driven from a small Ray task so that the match graph it
    resolves stays off the driver; the heavy steps are Ray Data operations it starts.

    Re-filter: every record block is rewritten when the records on disk were made with other verdict
    settings (or their pass never completed); contamination and novelty are recomputed from the stored
    drafts when their settings differ from those synth/work was generated with. synth/work is only read.
    """
    import ray

    syn = cfg.synthesize
    state = verdict_state(cfg, old)
    now = state["verdict_parts"]
    rewrite = state["records_verdict_parts"] != now
    changed = [k for k in _RECHECKED if state["work_verdict_parts"].get(k) != now[k]]
    refilter = None
    if changed and syn.filter.enabled:
        log.info("synthesize: re-filtering: %s changed since synth/work was generated; recomputing contamination "
                 "and novelty from the stored drafts", ", ".join(changed))
        refilter = {"filter_cfg": syn.filter.model_dump(),
                    "references": cfg.section_dict("references") if syn.filter.novelty else None}
    elif rewrite and (old or {}).get("records_verdict_parts") is not None:
        log.info("synthesize: re-filtering: verdict settings changed (%s); rewriting synth/records from synth/work",
                 "; ".join(_differences(old["records_verdict_parts"], now)))
    dedup = ({"threshold": syn.filter.dedup_threshold, "num_perm": syn.filter.num_perm}
             if syn.filter.enabled and syn.filter.dedup else None)
    kwargs = {"work_uri": paths.work, "records_uri": paths.records, "num_samples": syn.num_samples,
              "block_size": syn.block_size, "rules": vars(RejectRules.from_config(syn)), "dedup": dedup,
              "s3_cfg": cfg.storage.s3.model_dump(), "rewrite": rewrite, "refilter": refilter}
    task = ray.remote(num_cpus=0.25, max_retries=1)(_finalize_remote)
    return ray.get(task.remote(kwargs))


# ------------------------------------------------------------------------------------- the job
@holds_run_root
def run_synthesize(cfg: DominoConfig, overwrite: bool = False) -> dict[str, Any]:
    """Generate, grade, filter and write N records under <run>/synth/; resumable (module docstring)."""
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    syn = cfg.synthesize
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(cfg.run.output)
    paths = SynthPaths(cfg.run.output)
    inputs = _resolve_draft_length(cfg, storage, _prepare_inputs(cfg, storage))
    _check_few_shot_length(cfg, inputs)
    _check_filter_inputs(cfg, storage)
    fingerprint, parts = synthesis_fingerprint(cfg, inputs.representation_sha256)
    old = _claim_output(storage, paths, fingerprint, parts, overwrite)
    if old is not None and old.get("num_samples") not in (None, syn.num_samples):
        log.info("synthesize: num_samples %s -> %d: %s", old["num_samples"], syn.num_samples,
                 "extending (only the new blocks are generated)" if syn.num_samples > old["num_samples"]
                 else "shrinking (records past N are dropped; their work blocks are kept)")
    attempts = int((old or {}).get("attempts", 0)) + 1
    head = {"fingerprint": fingerprint, "fingerprint_parts": parts, "config": redact_secrets(cfg.to_dict()),
            "versions": package_versions(), "num_samples": syn.num_samples, "block_size": syn.block_size,
            "backbone": inputs.backbone, "representation_sha256": inputs.representation_sha256,
            "draft_max_tokens": inputs.draft_max_tokens,
            "attempts": attempts, "records": paths.records, **verdict_state(cfg, old)}
    storage.write_json(paths.manifest, {**head, "status": "running"})
    run_manifest = RunManifest(storage, cfg.run.output)
    run_manifest.update_stage("synthesize", "running", fingerprint, config=cfg.to_dict())
    try:
        total = blocks.num_blocks(syn.num_samples, syn.block_size)
        checked = check_work_blocks(storage, paths, syn.num_samples, syn.block_size)
        todo = checked["todo"]
        log.info("synthesize: %d seeds in %d blocks of %d; %d blocks already written, %d to generate",
                 syn.num_samples, total, syn.block_size, total - len(todo), len(todo))
        ensure_ray()
        gen = {"blocks": 0, "rows": 0, "seconds": 0.0, "samples_per_second": None, "steady_samples_per_second": None,
               "missing": [], "first_block_seconds": None, "generation_start_seconds": None, "generation_window": None,
               "max_blocks_per_write_call": 0, "max_calls_per_block": 0,
               "unplanned_merges": 0}
        if todo:
            plan = _resource_plan(cfg)
            gen = _stream(build_synthesis_plan(cfg, todo, inputs, paths, plan), todo, total, plan_groups(cfg, todo))
        if gen["missing"]:
            missing = gen["missing"]
            raise SynthesisIncomplete(
                f"synthesize: {len(missing)} of {len(todo)} blocks failed and were skipped (Ray Data tolerates up to "
                f"synthesize.max_errored_blocks={syn.max_errored_blocks}; the errors are in the log above): blocks "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. The other {gen['blocks']} are written; re-run the "
                f"same command to generate only the missing ones. No records were written (the final pass needs "
                f"every block)")
        counts = _finalize(cfg, paths, old)
        if counts["rows"] != syn.num_samples:
            raise RuntimeError(f"synthesize: {counts['rows']} records for {syn.num_samples} seeds; the work files are "
                               f"inconsistent, re-run with --overwrite")
    except BaseException as e:
        status = "incomplete" if isinstance(e, SynthesisIncomplete) else "failed"
        extra = {"blocks": {"total": total, "skipped": total - len(todo), "generated": gen["blocks"],
                            "failed": len(gen["missing"])}} if status == "incomplete" else {}
        storage.write_json(paths.manifest, {**head, **extra, "status": status, "error": f"{type(e).__name__}: {e}"})
        run_manifest.update_stage("synthesize", "failed", fingerprint, error=f"{type(e).__name__}: {e}")
        raise
    wall = time.time() - t0
    summary = {
        **head,
        "status": "completed",
        "records_verdict_parts": verdict_parts(cfg),  # the records on disk now follow these settings
        "blocks": {"total": total, "skipped": total - len(todo), "generated": gen["blocks"]},
        # the unit of work, as the writer saw it: 1 and 1 when every seed block travelled alone and whole
        "block_flow": {"regenerated": checked["regenerated"], "max_blocks_per_write_call": gen["max_blocks_per_write_call"],
                       "max_calls_per_block": gen["max_calls_per_block"], "unplanned_merges": gen["unplanned_merges"],
                       "first_block_seconds": gen["first_block_seconds"],
                       "generation_start_seconds": gen["generation_start_seconds"],
                       # [first draft call, last written block] in Unix seconds: the steady rate's window
                       "generation_window": gen["generation_window"]},
        "record_blocks_written": counts["record_blocks_written"],
        "rows_generated": gen["rows"],
        "counts": {k: v for k, v in counts.items()
                   if k not in ("tokens_in", "tokens_out", "finalize_seconds", "record_blocks_written",
                                "finalize_write_seconds", "peak_rss_mb")},
        "tokens_in": counts["tokens_in"],
        "tokens_out": counts["tokens_out"],
        "generate_seconds": gen["seconds"],
        "finalize_seconds": counts["finalize_seconds"],
        # measurements of this pass, not counts of the records: they differ between identical runs
        "finalize_write_seconds": counts.get("finalize_write_seconds"),
        "finalize_peak_rss_mb": counts.get("peak_rss_mb"),
        "wall_seconds": round(wall, 3),
        "samples_per_second": gen["samples_per_second"],
        "steady_samples_per_second": gen["steady_samples_per_second"],
    }
    storage.write_json(paths.manifest, summary)
    run_manifest.update_stage("synthesize", "completed", fingerprint, records=paths.records,
                              rows=counts["rows"], accepted=counts["accepted"],
                              reject_reasons={k: v for k, v in counts["reject_reasons"].items() if v},
                              samples_per_second=gen["samples_per_second"], wall_seconds=round(wall, 3))
    log.info("synthesize: %d records, %d accepted, %s samples/s, %.1f s", counts["rows"], counts["accepted"],
             gen["samples_per_second"], wall)
    return {k: v for k, v in summary.items() if k not in ("config", "fingerprint_parts", "versions")}
