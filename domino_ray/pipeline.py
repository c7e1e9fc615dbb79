"""`domino run`: learn -> synthesize -> finetune -> evaluate (base and fine-tuned) -> report, resumably.

    domino run --config examples/quickstart.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --config CFG

Each stage has a fingerprint over the config sections it reads plus the fingerprints of the stages it
consumes and a hash of their artifacts (the representation's sha256, the synthesis manifest). The
fingerprints are kept in the manifest's `pipeline` record; a re-run skips a stage whose fingerprint is
unchanged and whose output exists, so changing `evaluate` re-runs only the evaluations, and changing
`learn` re-runs everything after it. Both the starting model (`eval/base`) and the fine-tuned one
(`eval/finetuned`) are evaluated on the same benchmark slice; the pass@1 delta goes into the manifest
and a summary table is printed at the end.

When a held-out set exists (`references.holdout`, else `report.heldout`) and `evaluate.heldout_nll`
is on, both models are also scored on it (`heldout_nll_base`, `heldout_nll_finetuned`: the mean token
NLL of the held-out samples, `evaluate/nll.py`); results carry it under `heldout_nll`.
Baselines leave out what they do not use: drafts without the soft prompt (`synthesize.draft.enabled:
false`) skip learn, and `finetune.data: references` skips learn and synthesize.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from domino_ray.config import DominoConfig, absolute_local_paths
from domino_ray.manifest import RunManifest, StageBlocked, config_fingerprint
from domino_ray.layout import EVAL_BASE, EVAL_FINETUNED, RunLayout
from domino_ray.runlock import holds_run_root
from domino_ray.storage import Storage, join_uri

__all__ = ["run_pipeline", "plan_stages", "stage_fingerprints", "PipelineStage", "StageBlocked", "format_summary"]

log = logging.getLogger(__name__)

RECORD = "pipeline"  # manifest stage record holding the pipeline's own fingerprints and results
BASE, FINETUNED = EVAL_BASE, EVAL_FINETUNED  # result names under <run>/eval/


@dataclass
class PipelineStage:
    """One step of the pipeline: what it depends on, what proves it finished, and how to run it."""

    name: str
    deps: Callable[[], list[Any]]  # config sections, model ids and upstream hashes; evaluated lazily
    artifact: Callable[[], str]  # URI that exists once the stage has completed
    run: Callable[[], dict[str, Any]]
    needs: tuple[str, ...] = ()  # stages whose output it consumes: blocked when one of them is blocked


# ------------------------------------------------------------------------------------- helpers


def _sha_of(storage: Storage, uri: str) -> Optional[str]:
    """sha256 of a small file, None when absent (a missing upstream artifact forces a re-run)."""
    if not storage.exists(uri):
        return None
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def _representation_sha(storage: Storage, run_root: str) -> Optional[str]:
    uri = RunLayout(run_root).representation_meta
    return storage.read_json(uri).get("sha256") if storage.exists(uri) else None


def finetuned_model_args(cfg: DominoConfig, ft_summary: dict[str, Any], base_model: str) -> dict[str, Optional[str]]:
    """How `run_evaluate` loads the fine-tuned model: the merged or full model if written, else base + LoRA."""
    if ft_summary.get("merged"):
        return {"model": ft_summary["merged"], "lora": None}
    if ft_summary.get("model"):
        return {"model": ft_summary["model"], "lora": None}
    return {"model": base_model, "lora": ft_summary["adapter"]}


def _finetune_outputs(storage: Storage, run_root: str) -> dict[str, Optional[str]]:
    """The finetune outputs on storage (used when the finetune stage itself was skipped)."""
    from domino_ray.finetune import finetune_paths

    paths = finetune_paths(run_root)
    has = {k: storage.exists(join_uri(paths[k], "config.json" if k != "adapter" else "adapter_config.json"))
           for k in ("adapter", "model", "merged")}
    return {k: (paths[k] if has[k] else None) for k in has}


def has_heldout(cfg: DominoConfig) -> bool:
    """Whether the config names a held-out set for the held-out NLL."""
    return bool(cfg.references.holdout or cfg.report.heldout)


def _read_nll(storage: Storage, run: str, name: str) -> Optional[dict[str, Any]]:
    uri = RunLayout(run).eval_nll(name)
    return storage.read_json(uri) if storage.exists(uri) else None


def _pass_at_1(summary: Optional[dict[str, Any]]) -> Optional[float]:
    if not summary:
        return None
    value = (summary.get("pass_at_k") or {}).get("pass@1")
    return float(value) if value is not None else None


# ------------------------------------------------------------------------------------- the plan
def plan_stages(cfg: DominoConfig, storage: Storage, state: dict[str, Any]) -> list[PipelineStage]:
    """The enabled stages, in order. `state` collects stage outputs the later stages read."""
    from domino_ray.finetune import resolve_base_model

    run = cfg.run.output
    layout = RunLayout(run)
    sec = cfg.section_dict
    base_model = resolve_base_model(cfg)
    fps = state["fingerprints"]

    eval_summary = layout.eval_summary

    def learn() -> dict[str, Any]:
        from domino_ray.learn import run_learn

        return run_learn(cfg)

    def synthesize() -> dict[str, Any]:
        from domino_ray.synthesize import run_synthesize

        # overwrite only bites when synthesis's own fingerprint differs (learn or its config changed):
        # records of the same config are resumed, stale ones replaced instead of refused
        return run_synthesize(cfg, overwrite=True)

    def finetune() -> dict[str, Any]:
        from domino_ray.finetune import run_finetune

        return run_finetune(cfg)

    def evaluate_base() -> dict[str, Any]:
        from domino_ray.evaluate import run_evaluate

        return run_evaluate(cfg, model=base_model, lora=None, name=BASE)

    def evaluate_finetuned() -> dict[str, Any]:
        from domino_ray.evaluate import run_evaluate

        args = finetuned_model_args(cfg, _finetune_outputs(storage, run), base_model)
        return run_evaluate(cfg, name=FINETUNED, **args)

    def nll_base() -> dict[str, Any]:
        from domino_ray.evaluate.nll import run_heldout_nll

        return run_heldout_nll(cfg, model=base_model, lora=None, name=BASE)

    def nll_finetuned() -> dict[str, Any]:
        from domino_ray.evaluate.nll import run_heldout_nll

        args = finetuned_model_args(cfg, _finetune_outputs(storage, run), base_model)
        return run_heldout_nll(cfg, name=FINETUNED, **args)

    nll_artifact = layout.eval_nll

    def report() -> dict[str, Any]:
        from domino_ray.report import build_report

        return {"report": build_report(run, compare=[], config=cfg)}  # cfg carries the S3 endpoint

    nll_keys = ("heldout_nll", "nll_batch_size")
    eval_deps = {k: v for k, v in sec("evaluate").items() if k not in ("enabled", "compare_base") + nll_keys}
    # the held-out NLL reads the references (its split), the held-out file, the engine dtype and batch size
    nll_deps = [sec("references"), cfg.report.heldout, cfg.report.heldout_text_field, cfg.evaluate.nll_batch_size,
                cfg.evaluate.engine.dtype, cfg.evaluate.pool.num_gpus > 0]
    synthetic = cfg.finetune.data == "synthetic"  # references-only SFT needs neither learn nor synthesize
    stages = []
    if synthetic and cfg.synthesize.draft.enabled:  # the soft prompt D is only read by the draft stage
        stages.append(PipelineStage("learn", lambda: [sec("backbone"), sec("references"), sec("learn"), cfg.run.seed],
                                    lambda: layout.representation_meta, learn))
    if synthetic:
        stages.append(PipelineStage(
            "synthesize",
            lambda: [sec("synthesize"), sec("sandbox"), cfg.run.name, cfg.run.seed, fps.get("learn"),
                     _representation_sha(storage, run)],
            lambda: layout.synth_manifest, synthesize))
    if cfg.finetune.enabled:
        stages.append(PipelineStage(
            "finetune",
            lambda: [sec("finetune"), base_model, cfg.run.seed, fps.get("synthesize"),
                     _sha_of(storage, layout.synth_manifest)] if synthetic else
                    [sec("finetune"), base_model, cfg.run.seed, sec("references")],
            lambda: join_uri(layout.finetune_output("adapter" if cfg.finetune.method == "lora" else "model"),
                             "adapter_config.json" if cfg.finetune.method == "lora" else "config.json"),
            finetune))
    if cfg.evaluate.enabled and (cfg.evaluate.compare_base or not cfg.finetune.enabled):
        stages.append(PipelineStage("evaluate_base", lambda: [eval_deps, sec("sandbox"), base_model],
                                    lambda: eval_summary(BASE), evaluate_base))
    if cfg.evaluate.enabled and cfg.finetune.enabled:
        stages.append(PipelineStage("evaluate_finetuned",
                                    lambda: [eval_deps, sec("sandbox"), fps.get("finetune")],
                                    lambda: eval_summary(FINETUNED), evaluate_finetuned, needs=("finetune",)))
    if cfg.evaluate.enabled and cfg.evaluate.heldout_nll and has_heldout(cfg):
        if cfg.evaluate.compare_base or not cfg.finetune.enabled:
            stages.append(PipelineStage("heldout_nll_base", lambda: [nll_deps, base_model],
                                        lambda: nll_artifact(BASE), nll_base))
        if cfg.finetune.enabled:
            stages.append(PipelineStage("heldout_nll_finetuned", lambda: [nll_deps, fps.get("finetune")],
                                        lambda: nll_artifact(FINETUNED), nll_finetuned, needs=("finetune",)))
    if cfg.report.enabled:
        # the report reads every artifact, so it follows every upstream fingerprint
        stages.append(PipelineStage("report", lambda: [sec("report"), {k: v for k, v in fps.items() if k != "report"}],
                                    lambda: layout.report_file("report.html"), report))
    return stages


def stage_fingerprints(cfg: DominoConfig, storage: Storage) -> dict[str, str]:
    """The fingerprint of every enabled stage for this config and the artifacts on storage now."""
    state: dict[str, Any] = {"fingerprints": {}}
    for stage in plan_stages(cfg, storage, state):
        state["fingerprints"][stage.name] = config_fingerprint(stage.name, *stage.deps())
    return state["fingerprints"]


# ------------------------------------------------------------------------------------- running
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@holds_run_root
def run_pipeline(cfg: DominoConfig, print_summary: bool = True) -> dict[str, Any]:
    """Run every enabled stage not already done with the same fingerprint; returns the summary dict."""
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    cfg = absolute_local_paths(cfg)  # load_config already did; library callers may pass relative paths
    run = cfg.run.output
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(run)
    manifest = RunManifest(storage, run)
    previous = (manifest.stage(RECORD) or {}).get("fingerprints", {})
    state: dict[str, Any] = {"fingerprints": {}, "stages": {}}
    started = _now()
    manifest.update_stage(RECORD, "running", config=cfg.to_dict(), fingerprints=previous)
    ensure_ray()  # one cluster for every stage (joins RAY_ADDRESS under `ray job submit`)
    for stage in plan_stages(cfg, storage, state):
        fp = config_fingerprint(stage.name, *stage.deps())
        state["fingerprints"][stage.name] = fp
        if previous.get(stage.name) == fp and storage.exists(stage.artifact()):
            log.info("pipeline: %s already completed with this config (fingerprint %s), skipping", stage.name, fp)
            state["stages"][stage.name] = {"status": "skipped", "seconds": 0.0}
            continue
        log.info("pipeline: running %s (fingerprint %s)", stage.name, fp)
        # forget the old fingerprint first: if this attempt dies half-way, its output is no longer
        # the old config's, and a re-run with the old config must not skip it
        previous.pop(stage.name, None)
        manifest.update_stage(RECORD, "running", fingerprints={**previous, **_done(state)},
                              stages=state["stages"], started_at=started)
        blocked_by = [n for n in stage.needs if state["stages"].get(n, {}).get("status") == "blocked"]
        if blocked_by:
            state["stages"][stage.name] = {"status": "blocked", "reason": f"needs {', '.join(blocked_by)}"}
            continue
        t = time.time()
        try:
            out = stage.run()
        except StageBlocked as e:
            # no data to go on (e.g. 0 accepted records): say why, run what does not need this stage
            log.warning("pipeline: %s cannot run: %s", stage.name, e)
            state["stages"][stage.name] = {"status": "blocked", "reason": str(e),
                                           "seconds": round(time.time() - t, 1)}
            continue
        except BaseException as e:
            state["stages"][stage.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            manifest.update_stage(RECORD, "failed", fingerprints={**previous, **_done(state)},
                                  stages=state["stages"], started_at=started, failed_stage=stage.name,
                                  error=f"{type(e).__name__}: {e}")
            raise
        state["stages"][stage.name] = {"status": "ran", "seconds": round(time.time() - t, 1)}
        state[stage.name] = out
        # record progress after every stage, so a crash later does not redo this one
        manifest.update_stage(RECORD, "running", fingerprints={**previous, **_done(state)},
                              stages=state["stages"], started_at=started)
    result = _results(cfg, storage, state, time.time() - t0)
    blocked = {k: v["reason"] for k, v in state["stages"].items() if v["status"] == "blocked"}
    manifest.update_stage(RECORD, "completed_with_blocked_stages" if blocked else "completed", fingerprints={**previous, **_done(state)}, started_at=started,
                          **{k: v for k, v in result.items() if k != "run"})
    if print_summary:
        print(format_summary(result), flush=True)
    return result


def _done(state: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the stages that ran or were skipped (i.e. are complete) in this invocation."""
    return {k: state["fingerprints"][k] for k, v in state["stages"].items() if v["status"] in ("ran", "skipped")}


def _read_eval(storage: Storage, run: str, name: str) -> Optional[dict[str, Any]]:
    uri = RunLayout(run).eval_summary(name)
    return storage.read_json(uri) if storage.exists(uri) else None


def _results(cfg: DominoConfig, storage: Storage, state: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Headline numbers read back from the artifacts (the same whether a stage ran now or before)."""
    run = cfg.run.output
    base, tuned = _read_eval(storage, run, BASE), _read_eval(storage, run, FINETUNED)
    p_base, p_tuned = _pass_at_1(base), _pass_at_1(tuned)
    n_base, n_tuned = _read_nll(storage, run, BASE), _read_nll(storage, run, FINETUNED)
    nll_base, nll_tuned = (n_base or {}).get("nll"), (n_tuned or {}).get("nll")
    manifest = RunManifest(storage, run).load()["stages"]
    synth = manifest.get("synthesize") or {}
    ft = manifest.get("finetune") or {}
    return {
        "run": run,
        "stages": state["stages"],
        "synthesize": {"rows": synth.get("rows"), "accepted": synth.get("accepted"),
                       "reject_reasons": synth.get("reject_reasons")},
        "finetune": {"first_loss": ft.get("first_loss"), "final_loss": ft.get("final_loss"),
                     "steps": ft.get("steps"), "adapter": ft.get("adapter"), "model": ft.get("model"),
                     "merged": ft.get("merged")},
        "benchmark": (tuned or base or {}).get("benchmark", cfg.evaluate.benchmark),
        "num_problems": (tuned or base or {}).get("num_problems"),
        "pass_at_1": {BASE: p_base, FINETUNED: p_tuned,
                      "delta": (p_tuned - p_base) if p_base is not None and p_tuned is not None else None},
        "heldout_nll": {BASE: nll_base, FINETUNED: nll_tuned,
                        "delta": (nll_tuned - nll_base) if nll_base is not None and nll_tuned is not None else None,
                        "num_samples": (n_tuned or n_base or {}).get("num_samples"),
                        "tokens": (n_tuned or n_base or {}).get("tokens")},
        "report": (state.get("report") or {}).get("report") or (RunLayout(run).report_file("report.html") if cfg.report.enabled else None),
        "seconds": round(seconds, 1),
        **_details(storage, run),
    }


def _details(storage: Storage, run: str) -> dict[str, Any]:
    """Learn curve, accepted examples, pass@k of both models (domino_ray/summary.py); a summary never
    fails for want of them."""
    from domino_ray.summary import run_details

    try:
        return run_details(storage, run)
    except Exception as e:  # noqa: BLE001 - printing extras must not fail a finished run
        log.warning("pipeline: summary details unavailable: %s", e)
        return {}


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_summary(result: dict[str, Any]) -> str:
    """The human summary `domino run` prints: one line per stage, then the headline numbers."""
    lines = [f"domino run: {result['run']}  ({result['seconds']:.0f} s)", "",
             f"  {'stage':<23}{'status':<10}{'seconds':>8}"]
    for name, info in result["stages"].items():
        lines.append(f"  {name:<23}{info['status']:<10}{info.get('seconds', 0.0):>8.1f}")
    for name, info in result["stages"].items():
        if info["status"] == "blocked":
            lines.append(f"  BLOCKED {name}: {info['reason']}")
    syn, ft, p = result["synthesize"], result["finetune"], result["pass_at_1"]
    lines.append("")
    from domino_ray.summary import format_examples, format_funnel, format_learn

    lines += format_learn(result.get("learn"))
    if syn.get("rows") is not None:
        reasons = ", ".join(f"{k} {v}" for k, v in (syn.get("reject_reasons") or {}).items() if v)
        lines.append(f"  synthetic records  {syn['accepted']} accepted of {syn['rows']}" + (f"  (rejected: {reasons})" if reasons else ""))
        lines += format_funnel(syn["rows"], syn["accepted"], syn.get("reject_reasons"))
    if ft.get("steps"):
        lines.append(f"  fine-tuning        {ft['steps']} steps, loss {_fmt(ft['first_loss'])} -> {_fmt(ft['final_loss'])}")
    pk = result.get("pass_at_k") or {}
    ks = sorted({k for m in (pk.get(BASE) or {}, pk.get(FINETUNED) or {}) for k in m}, key=lambda k: int(k.split("@")[1]))
    if ks:
        lines.append(f"  on {result['benchmark']} ({result['num_problems']} problems):")
        for k in ks:
            b, t = (pk.get(BASE) or {}).get(k), (pk.get(FINETUNED) or {}).get(k)
            d = t - b if b is not None and t is not None else None
            lines.append(f"    {k:<17}base {_fmt(b)}  fine-tuned {_fmt(t)}  delta {_fmt(d, signed=True)}")
    elif p[BASE] is not None or p[FINETUNED] is not None:
        lines.append(f"  pass@1 on {result['benchmark']} ({result['num_problems']} problems): "
                     f"base {_fmt(p[BASE])}  fine-tuned {_fmt(p[FINETUNED])}  delta {_fmt(p['delta'], signed=True)}")
    nll = result.get("heldout_nll") or {}
    if nll.get(BASE) is not None or nll.get(FINETUNED) is not None:
        lines.append(f"  held-out NLL ({nll.get('num_samples')} samples, {nll.get('tokens')} tokens): base {_fmt(nll.get(BASE))}  "
                     f"fine-tuned {_fmt(nll.get(FINETUNED))}  delta {_fmt(nll.get('delta'), signed=True)} (lower is better)")
    if result.get("examples"):
        lines.append("")
        lines += format_examples(result["examples"])
        lines.append("")
    if result.get("report"):
        lines.append(f"  report             {result['report']}")
    return "\n".join(lines)
