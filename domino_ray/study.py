"""`domino study`: does the learned D give better data than the obvious alternatives? (DESIGN.md section 11)

    domino study --config examples/study.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/study.py --config CFG

One run root, one sub-run per arm, each a plain `domino run` (`pipeline.run_pipeline`) of a config
derived from the study config, so every arm has the same references (and held-out split), run name
and seeds (hence the same per-draft seeds), sample budget (`synthesize.num_samples`), fine-tuning and
evaluation settings, and a re-run skips whatever each arm has already finished (stage fingerprints):

    <root>/base/                the starting model, evaluated once: pass@k and held-out NLL
    <root>/arms/domino/         learn (lambda = study.lambda_domino) -> synthesize -> finetune -> evaluate
    <root>/arms/l1-only/        the same with lambda = 0 (plain prompt tuning)
    <root>/arms/few-shot/       no learn; drafts from the instruct model shown study.few_shot_k references
    <root>/arms/no-prompt/      no learn; drafts from the bare model (references.prefix or BOS only)
    <root>/arms/reference-sft/  no learn, no synthesis; fine-tune on the training references alone
    <root>/study.json           every arm's numbers (and its error, if it failed)
    <root>/report/              the comparison report: study.html, study.md, plots, metrics.json

An arm that fails (say 0 accepted records, so nothing to fine-tune on) is recorded with its error
and the study goes on with the next one; what it did produce is still measured and reported.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Optional

from domino_ray.config import DominoConfig, config_from_dict
from domino_ray.layout import BASE_RUN, RunLayout
from domino_ray.runlock import holds_run_root
from domino_ray.storage import Storage

__all__ = ["BASE_RUN", "arm_config", "base_config", "run_study", "collect_arm", "format_study"]

log = logging.getLogger(__name__)



def _derive(cfg: DominoConfig, output: str, changes: dict[str, Any]) -> DominoConfig:
    """A copy of the study config with `changes` (dotted paths) applied and its own run root."""
    data = copy.deepcopy(cfg.to_dict())
    data.pop("preset", None)  # already applied to cfg; applying it again could not change anything
    changes = {"run.output": output, "report.enabled": False, "evaluate.compare_base": False, **changes}
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[key] = value
    return config_from_dict(data, source=f"<study arm {output}>")


def arm_config(cfg: DominoConfig, arm: str) -> DominoConfig:
    """The `domino run` config of one arm (module docstring)."""
    out = RunLayout(cfg.run.output).arm(arm).root
    draft_off = {"synthesize.draft.enabled": False}
    changes: dict[str, dict[str, Any]] = {
        "domino": {"learn.lambda": cfg.study.lambda_domino},
        "l1-only": {"learn.lambda": 0.0},
        "few-shot": {**draft_off, "synthesize.draft.few_shot": cfg.study.few_shot_k,
                     "synthesize.draft.engine.chat_template": cfg.study.few_shot_chat},
        "no-prompt": {**draft_off, "synthesize.draft.few_shot": 0, "synthesize.draft.engine.chat_template": False},
        "reference-sft": {"finetune.data": "references"},
    }
    if arm not in changes:
        raise ValueError(f"study.arms: unknown arm {arm!r}; known: {sorted(changes)}")
    return _derive(cfg, out, changes[arm])


def base_config(cfg: DominoConfig) -> DominoConfig:
    """The sub-run that evaluates the starting model: no learn, synthesis or fine-tuning."""
    return _derive(cfg, RunLayout(cfg.run.output).base_run.root,
                   {"finetune.enabled": False, "finetune.data": "references", "evaluate.compare_base": True})


# ------------------------------------------------------------------------------------- numbers
def _read(storage: Storage, uri: str) -> Optional[dict[str, Any]]:
    return storage.read_json(uri) if storage.exists(uri) else None


def collect_arm(storage: Storage, root: str, evaluation: str) -> dict[str, Any]:
    """The headline numbers one sub-run wrote: funnel counts, pass@k and held-out NLL of `evaluation`."""
    layout = RunLayout(root)
    manifest = _read(storage, layout.manifest) or {}
    synth = (manifest.get("stages") or {}).get("synthesize") or {}
    ev = _read(storage, layout.eval_summary(evaluation)) or {}
    nll = _read(storage, layout.eval_nll(evaluation)) or {}
    ft = (manifest.get("stages") or {}).get("finetune") or {}
    rows, accepted = synth.get("rows"), synth.get("accepted")
    return {
        "records": rows, "accepted": accepted,
        "acceptance_rate": (accepted / rows) if rows else None,
        "reject_reasons": synth.get("reject_reasons"),
        "finetune_examples": ft.get("examples"), "finetune_steps": ft.get("steps"),
        "finetune_final_loss": ft.get("final_loss"),
        "pass_at_k": ev.get("pass_at_k"), "num_problems": ev.get("num_problems"), "n": ev.get("n"),
        "heldout_nll": nll.get("nll"), "heldout_token_nll": nll.get("token_nll"),
        "heldout_samples": nll.get("num_samples"),
    }


# ------------------------------------------------------------------------------------- the study
def _run_one(sub: DominoConfig, name: str) -> dict[str, Any]:
    from domino_ray.pipeline import run_pipeline

    t = time.time()
    try:
        result = run_pipeline(sub, print_summary=False)
        return {"status": "completed", "stages": result["stages"], "seconds": round(time.time() - t, 1)}
    except Exception as e:  # one arm's failure is a finding, not the end of the study
        log.warning("study: arm %s failed after %.0fs: %s: %s", name, time.time() - t, type(e).__name__, e)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - t, 1)}


@holds_run_root
def run_study(cfg: DominoConfig, print_summary: bool = True, report: bool = True) -> dict[str, Any]:
    """Run the base evaluation and every arm (each skips what it already finished), then the report."""
    from domino_ray.config import absolute_local_paths
    from domino_ray.evaluate.nll import heldout_texts
    from domino_ray.pipeline import BASE, FINETUNED

    t0 = time.time()
    cfg = absolute_local_paths(cfg)
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(cfg.run.output)
    if not heldout_texts(cfg, storage)[0]:
        raise ValueError("the study compares held-out fidelity and NLL: set references.holdout (e.g. 8) or report.heldout")
    root = cfg.run.output
    runs: dict[str, dict[str, Any]] = {}
    subs = [(BASE_RUN, base_config(cfg))] + [(arm, arm_config(cfg, arm)) for arm in cfg.study.arms]
    for name, sub in subs:
        log.info("study: %s -> %s", name, sub.run.output)
        runs[name] = _run_one(sub, name)
        runs[name].update(root=sub.run.output, **collect_arm(storage, sub.run.output, BASE if name == BASE_RUN else FINETUNED))
        storage.write_json(RunLayout(root).study, {"root": root, "runs": runs, "status": "running"})
    out: dict[str, Any] = {"root": root, "arms": list(cfg.study.arms), "runs": runs, "report": None}
    if report:
        from domino_ray.report.study import build_study_report

        try:
            out["report"] = build_study_report(cfg, {n: runs[n]["root"] for n in cfg.study.arms}, runs[BASE_RUN]["root"],
                                               statuses={n: r["status"] for n, r in runs.items()})
        except Exception as e:  # the numbers above are already on storage; say why the pictures are missing
            log.warning("study: report failed: %s: %s", type(e).__name__, e)
            out["report_error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = round(time.time() - t0, 1)
    out["status"] = "completed" if all(r["status"] == "completed" for r in runs.values()) else "completed_with_failures"
    storage.write_json(RunLayout(root).study, out)
    if print_summary:
        print(format_study(out), flush=True)
    return out


def _f(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_study(out: dict[str, Any]) -> str:
    """The table `domino study` prints: one line per sub-run."""
    runs = out["runs"]
    ks = sorted({k for r in runs.values() for k in (r.get("pass_at_k") or {})}, key=lambda k: int(k.split("@")[-1]))
    base_nll = runs.get(BASE_RUN, {}).get("heldout_nll")
    head = f"  {'run':<15}{'status':<10}{'accepted':>10}{'NLL':>8}{'dNLL':>8}" + "".join(f"{k:>9}" for k in ks) + f"{'seconds':>9}"
    lines = [f"domino study: {out['root']}  ({out['seconds']:.0f} s)", "", head]
    for name, r in runs.items():
        acc = f"{r['accepted']}/{r['records']}" if r.get("records") is not None else "-"
        delta = (r["heldout_nll"] - base_nll) if r.get("heldout_nll") is not None and base_nll is not None and name != BASE_RUN else None
        lines.append(f"  {name:<15}{r['status']:<10}{acc:>10}{_f(r.get('heldout_nll')):>8}{_f(delta, True):>8}"
                     + "".join(f"{_f((r.get('pass_at_k') or {}).get(k)):>9}" for k in ks) + f"{r['seconds']:>9.0f}")
        if r.get("error"):
            lines.append(f"  {'':<15}{r['error'][:160]}")
    if out.get("report"):
        lines += ["", f"  report  {out['report']}"]
    if out.get("report_error"):
        lines += ["", f"  report failed: {out['report_error']}"]
    return "\n".join(lines)
