"""`domino synthesize`: the Ray Data plan from seed indices to record Parquet (DESIGN.md sections 2, 4, 5).

Layout under the run root:
    synth/manifest.json           fingerprint, config, versions, counts, tokens, timings
    synth/work/part-NNNNNN.parquet one per finished seed block (SYNTH_WORK_SCHEMA), written while streaming
    synth/records/part-NNNNNN.parquet the records (RECORD_SCHEMA), written by the final pass

Phase 1 (streaming, Ray Data): block ids of the blocks not yet in synth/work -> one row per seed ->
draft -> respond -> tests -> judge (LLM actor pools) -> execute (sandbox actors) -> per-row filters
(filter actors) -> BlockWriter (one actor; writes a block the moment its last row arrives). The
driver only reads one small row per written block, so its memory does not grow with N. A killed job
restarted with the same config lists synth/work, skips the finished blocks and redoes only the rest.

Phase 2 (`finalize.finalize_blocks`, Ray Data operations driven from one small Ray task): global
dedup (MinHash LSH bands grouped by key, candidate pairs verified, resolved in seed order over the
match graph only), final verdicts, counts, synth/records written by one task per few blocks. No task
holds state that grows with N.

Config fingerprint: the sections that change what a record contains (run name and seed, backbone,
references, synthesize without actor-pool sizes, sandbox when execute is on, the representation's
sha256). An existing output made with another fingerprint is refused unless `overwrite`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from domino_ray.config import DominoConfig
from domino_ray.manifest import RunManifest, config_fingerprint, package_versions, redact_secrets
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks
from domino_ray.synthesize.verdicts import RejectRules

__all__ = ["run_synthesize", "SynthesisConflict", "synthesis_fingerprint", "SynthPaths"]

log = logging.getLogger(__name__)


class SynthesisConflict(ValueError):
    """The output already holds records made with a different config (use --overwrite)."""


@dataclass(frozen=True)
class SynthPaths:
    root: str

    @property
    def synth(self) -> str:
        return join_uri(self.root, "synth")

    @property
    def work(self) -> str:
        return join_uri(self.synth, "work")

    @property
    def records(self) -> str:
        return join_uri(self.synth, "records")

    @property
    def manifest(self) -> str:
        return join_uri(self.synth, "manifest.json")


# ----------------------------------------------------------------------------------- fingerprint
_SCHEDULING = ("pool", "fit_cpus", "cluster_can_grow", "resource_wait_s")  # where and when, not what


def _without_pools(section: Any) -> Any:
    """Actor-pool sizes change speed, not records: a restart with more actors must still resume."""
    if isinstance(section, dict):
        return {k: _without_pools(v) for k, v in section.items() if k not in _SCHEDULING}
    return section


def fingerprint_parts(cfg: DominoConfig, representation_sha256: Optional[str]) -> dict[str, Any]:
    parts = {
        "run": {"name": cfg.run.name, "seed": cfg.run.seed},
        "backbone": {k: cfg.section_dict("backbone")[k] for k in ("model", "dtype", "trust_remote_code")},
        "references": cfg.section_dict("references"),
        "synthesize": _without_pools(cfg.section_dict("synthesize")),
        "representation_sha256": representation_sha256,
    }
    if cfg.synthesize.execute.enabled:
        parts["sandbox"] = _without_pools(cfg.section_dict("sandbox"))
    return parts


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
    baseline_prompts: tuple[str, ...] = ()  # one per seed index (few-shot baseline); empty = baseline_prompt
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
        prompts: tuple[str, ...] = ()
        if cfg.synthesize.draft.few_shot:
            from domino_ray.references import read_reference_split
            from domino_ray.synthesize.fewshot import few_shot_prompts

            train, _ = read_reference_split(cfg.references, storage)  # never the held-out samples
            prompts = tuple(few_shot_prompts(train, cfg.synthesize.draft.few_shot, cfg.synthesize.draft.few_shot_template,
                                             cfg.run.seed, cfg.synthesize.num_samples))
        return _Inputs(None, None, model, "", baseline, prompts)  # the prefix is already the whole prompt
    from transformers import AutoConfig

    from domino_ray.representation import check_compatible, load_representation

    root = cfg.run.output
    if not (storage.exists(join_uri(root, "representation", "representation.json"))
            or storage.exists(join_uri(root, "representation.json"))):
        raise FileNotFoundError(
            f"no representation under {join_uri(root, 'representation')}: run `domino learn --config CFG` first "
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


# ------------------------------------------------------------------------------------- the plan
def _pool_args(pool, num_cpus: Optional[float] = None) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    args: dict[str, Any] = {"batch_size": pool.batch_size, "num_cpus": pool.num_cpus if num_cpus is None else num_cpus,
                            "compute": ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)}
    if pool.num_gpus:
        args["num_gpus"] = pool.num_gpus
    return args


def build_synthesis_plan(cfg: DominoConfig, todo: list[int], inputs: _Inputs, paths: SynthPaths, plan=None):
    """The lazy Ray Data plan over the block ids in `todo` (DESIGN section 2's diagram, in code).
    `plan` (a resources.ResourcePlan) gives each pool the CPUs to request; default: as configured."""
    import ray
    from ray.data import ActorPoolStrategy

    from domino_ray.synthesize import stages
    from domino_ray.synthesize.resources import cpus_for

    syn = cfg.synthesize
    rules = vars(RejectRules.from_config(syn))
    s3 = cfg.storage.s3.model_dump()
    backbone = cfg.section_dict("backbone")
    common = {"backbone_cfg": backbone, "run": cfg.run.name, "rules": rules, "storage_cfg": s3}

    # from_items, not ray.data.range: a read task holds a whole CPU while backpressured, and on a
    # 2-CPU node that starves the actor pools forever. The list is one small dict per missing block.
    ds = ray.data.from_items([{"id": b} for b in todo], override_num_blocks=max(1, min(len(todo), 256)))
    ds = ds.map_batches(stages.expand_blocks, batch_size=None, num_cpus=0.1,
                        fn_kwargs={"num_samples": syn.num_samples, "block_size": syn.block_size, "run_seed": cfg.run.seed})

    def llm(ds, cls, stage_cfg, **extra):
        kwargs = {**common, "engine_cfg": stage_cfg.engine.model_dump(), "sampling": stage_cfg.sampling.model_dump(), **extra}
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_format="numpy",
                              **_pool_args(stage_cfg.pool, cpus_for(plan, cls.role, stage_cfg.pool.num_cpus)))

    draft_sampling = {**syn.draft.sampling.model_dump(),
                      "max_tokens": inputs.draft_max_tokens or syn.draft.sampling.max_tokens or DEFAULT_DRAFT_MAX_TOKENS}
    ds = llm(ds, stages.DraftStage, syn.draft, sampling=draft_sampling, soft_prompt=syn.draft.enabled,
             representation_uri=inputs.representation_uri, prefix=inputs.prefix, baseline_prompt=inputs.baseline_prompt,
             baseline_prompts=list(inputs.baseline_prompts))
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
                            **_pool_args(syn.execute.pool, cpus_for(plan, "execute", syn.execute.pool.num_cpus)),
                            **sandbox_remote_args(syn.execute.pool),
                            fn_constructor_kwargs={"sandbox_cfg": cfg.section_dict("sandbox"), "run": cfg.run.name,
                                                   "rules": rules})
    if syn.filter.enabled:
        ds = ds.map_batches(stages.RowFilterStage, batch_format="numpy",
                            **_pool_args(syn.filter.pool, cpus_for(plan, "filter", syn.filter.pool.num_cpus)),
                            fn_constructor_kwargs={"filter_cfg": syn.filter.model_dump(), "run": cfg.run.name,
                                                   "respond_enabled": syn.respond.enabled,
                                                   "references": cfg.section_dict("references") if syn.filter.novelty else None,
                                                   "s3_cfg": s3})
    constants = {"run": cfg.run.name, "backbone": inputs.backbone, "representation_sha256": inputs.representation_sha256,
                 "temperature": syn.draft.sampling.temperature, "top_p": syn.draft.sampling.top_p}
    # one writer actor: every row of a block must meet in one place to be written as one object
    return ds.map_batches(stages.BlockWriter, batch_size=None, batch_format="numpy", num_cpus=0.1,
                          compute=ActorPoolStrategy(size=1),
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


def _stream(ds, todo: list[int], total_blocks: int, num_samples: int) -> dict[str, Any]:
    """Run the plan; the driver sees one row per written block (progress, counts)."""
    from tqdm import tqdm

    t0 = time.time()
    rows = accepted = done = 0
    first: Optional[tuple[float, int]] = None  # (time, rows) at the first written block
    with tqdm(total=len(todo), desc="synthesize blocks", unit="block") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for block, n, ok in zip(batch["block"].tolist(), batch["rows"].tolist(), batch["accepted"].tolist()):
                rows, accepted, done = rows + n, accepted + ok, done + 1
                first = first or (time.time(), rows)
                bar.update(1)
                log.info("synthesize: block %d written (%d rows, %d pass the per-row checks); %d/%d blocks this run, "
                         "%d/%d overall", block, n, ok, done, len(todo), total_blocks - len(todo) + done, total_blocks)
    seconds = time.time() - t0
    if done != len(todo):
        raise RuntimeError(f"synthesize: the plan ended with {done} of {len(todo)} blocks written; re-run to finish")
    # steady state: after the first block, i.e. without actor start-up (engines load in tens of seconds)
    steady = None
    if first is not None and rows > first[1] and time.time() > first[0]:
        steady = round((rows - first[1]) / (time.time() - first[0]), 3)
    return {"blocks": done, "rows": rows, "seconds": round(seconds, 3),
            "samples_per_second": round(rows / seconds, 3) if seconds > 0 and rows else None,
            "steady_samples_per_second": steady}


def _finalize_remote(kwargs: dict) -> dict:
    from domino_ray.synthesize.finalize import finalize_blocks

    return finalize_blocks(**kwargs)


def _finalize(cfg: DominoConfig, paths: SynthPaths, rewrite: bool = False) -> dict[str, Any]:
    """The final pass (finalize.py), driven from a small Ray task so that the match graph it
    resolves stays off the driver; the heavy steps are Ray Data operations it starts."""
    import ray

    syn = cfg.synthesize
    dedup = ({"threshold": syn.filter.dedup_threshold, "num_perm": syn.filter.num_perm}
             if syn.filter.enabled and syn.filter.dedup else None)
    kwargs = {"work_uri": paths.work, "records_uri": paths.records, "num_samples": syn.num_samples,
              "block_size": syn.block_size, "rules": vars(RejectRules.from_config(syn)), "dedup": dedup,
              "s3_cfg": cfg.storage.s3.model_dump(), "rewrite": rewrite}
    task = ray.remote(num_cpus=0.25, max_retries=1)(_finalize_remote)
    return ray.get(task.remote(kwargs))


# ------------------------------------------------------------------------------------- the job
def run_synthesize(cfg: DominoConfig, overwrite: bool = False) -> dict[str, Any]:
    """Generate, grade, filter and write N records under <run>/synth/; resumable (module docstring)."""
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    syn = cfg.synthesize
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(cfg.run.output)
    paths = SynthPaths(cfg.run.output)
    inputs = _resolve_draft_length(cfg, storage, _prepare_inputs(cfg, storage))
    _check_filter_inputs(cfg, storage)
    fingerprint, parts = synthesis_fingerprint(cfg, inputs.representation_sha256)
    old = _claim_output(storage, paths, fingerprint, parts, overwrite)
    attempts = int((old or {}).get("attempts", 0)) + 1
    head = {"fingerprint": fingerprint, "fingerprint_parts": parts, "config": redact_secrets(cfg.to_dict()),
            "versions": package_versions(), "num_samples": syn.num_samples, "block_size": syn.block_size,
            "backbone": inputs.backbone, "representation_sha256": inputs.representation_sha256,
            "draft_max_tokens": inputs.draft_max_tokens,
            "attempts": attempts, "records": paths.records}
    storage.write_json(paths.manifest, {**head, "status": "running"})
    run_manifest = RunManifest(storage, cfg.run.output)
    run_manifest.update_stage("synthesize", "running", fingerprint, config=cfg.to_dict())
    try:
        total = blocks.num_blocks(syn.num_samples, syn.block_size)
        todo = blocks.missing_blocks(storage.list_files(paths.work, suffix=".parquet"), total)
        log.info("synthesize: %d seeds in %d blocks of %d; %d blocks already written, %d to generate",
                 syn.num_samples, total, syn.block_size, total - len(todo), len(todo))
        ensure_ray()
        gen = {"blocks": 0, "rows": 0, "seconds": 0.0, "samples_per_second": None, "steady_samples_per_second": None}
        if todo:
            plan = _resource_plan(cfg)
            gen = _stream(build_synthesis_plan(cfg, todo, inputs, paths, plan), todo, total, syn.num_samples)
        counts = _finalize(cfg, paths)
        if counts["rows"] != syn.num_samples:
            raise RuntimeError(f"synthesize: {counts['rows']} records for {syn.num_samples} seeds; the work files are "
                               f"inconsistent, re-run with --overwrite")
    except BaseException as e:
        storage.write_json(paths.manifest, {**head, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        run_manifest.update_stage("synthesize", "failed", fingerprint, error=f"{type(e).__name__}: {e}")
        raise
    wall = time.time() - t0
    summary = {
        **head,
        "status": "completed",
        "blocks": {"total": total, "skipped": total - len(todo), "generated": gen["blocks"]},
        "record_blocks_written": counts["record_blocks_written"],
        "rows_generated": gen["rows"],
        "counts": {k: v for k, v in counts.items()
                   if k not in ("tokens_in", "tokens_out", "finalize_seconds", "record_blocks_written")},
        "tokens_in": counts["tokens_in"],
        "tokens_out": counts["tokens_out"],
        "generate_seconds": gen["seconds"],
        "finalize_seconds": counts["finalize_seconds"],
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
