"""The run-root layout: every path under `<run>/`, named once (DESIGN.md section 2).

Stages ask a `RunLayout` for their paths and never spell a directory or file name themselves, so
the layout below is the whole truth about what a run root holds:

    <run>/.lock                          the job holding the run root (runlock.py)
    <run>/manifest.json                  config, versions, status/counts/timings of every stage
    <run>/representation/                domain.safetensors, representation.json, private.safetensors
    <run>/learn/                         Ray Train experiment: epoch_NNNN/ checkpoints (domain.pt,
                                         progress.json, ...), metrics.jsonl, outcome.json
    <run>/synth/manifest.json            synthesis fingerprint, counts, timings
    <run>/synth/work/part-NNNNNN.parquet one per finished seed block, written while streaming
    <run>/synth/records/part-NNNNNN.parquet  the records, written by the final pass
    <run>/finetune/                      checkpoints/, adapter/, model/, merged/, metrics.jsonl
    <run>/eval/<name>/                   results.parquet, summary.json, heldout_nll.json
    <run>/report/                        report.md/html, metrics.json, *.png (study.md/html for a study)
    <run>/study.json, arms/<arm>/, base/ a study root: its sub-runs are run roots themselves

Paths are URIs (a local path or `s3://bucket/prefix`), joined with `storage.join_uri`. The file-name
constants are public for code that joins names onto a path it was handed by Ray (the learn workers
write into Ray Train's experiment folder, which is `RunLayout.learn`).
"""

from __future__ import annotations

from dataclasses import dataclass

from domino_ray.storage import join_uri

__all__ = ["RunLayout", "LOCK_FILE", "MANIFEST_FILE", "REPRESENTATION_DIR", "REPRESENTATION_META",
           "REPRESENTATION_DOMAIN", "REPRESENTATION_PRIVATE", "LEARN_DIR", "LEARN_METRICS", "LEARN_OUTCOME",
           "LEARN_PROGRESS", "LEARN_DOMAIN", "SYNTH_DIR", "FINETUNE_DIR", "FINETUNE_OUTPUTS", "EVAL_DIR",
           "EVAL_RESULTS", "EVAL_SUMMARY", "EVAL_NLL", "EVAL_BASE", "EVAL_FINETUNED", "REPORT_DIR", "STUDY_FILE",
           "ARMS_DIR", "BASE_RUN", "TOP_LEVEL_DIRS"]

LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"

REPRESENTATION_DIR = "representation"
REPRESENTATION_META = "representation.json"  # written last: its presence marks a complete representation
REPRESENTATION_DOMAIN = "domain.safetensors"
REPRESENTATION_PRIVATE = "private.safetensors"

LEARN_DIR = "learn"  # also the Ray Train experiment name, so Ray writes exactly here
LEARN_METRICS = "metrics.jsonl"
LEARN_OUTCOME = "outcome.json"
LEARN_PROGRESS = "progress.json"  # inside each checkpoint folder
LEARN_DOMAIN = "domain.pt"  # inside each checkpoint folder

SYNTH_DIR = "synth"
_SYNTH_WORK, _SYNTH_RECORDS = "work", "records"

FINETUNE_DIR = "finetune"
FINETUNE_OUTPUTS = ("checkpoints", "adapter", "model", "merged")
_FINETUNE_METRICS = "metrics.jsonl"

EVAL_DIR = "eval"
EVAL_RESULTS = "results.parquet"
EVAL_SUMMARY = "summary.json"
EVAL_NLL = "heldout_nll.json"
EVAL_BASE, EVAL_FINETUNED = "base", "finetuned"  # the pipeline's two evaluations

REPORT_DIR = "report"

STUDY_FILE = "study.json"
ARMS_DIR = "arms"
BASE_RUN = "base"  # the study sub-run that evaluates the starting model once for every arm

# What makes a folder recognisable as a run root even without a manifest (report/load.py).
TOP_LEVEL_DIRS = (REPRESENTATION_DIR, LEARN_DIR, SYNTH_DIR, EVAL_DIR)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run root. `RunLayout(cfg.run.output).synth_records` and so on."""

    root: str

    def _at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    # -- the run root itself ---------------------------------------------------------------------
    @property
    def lock(self) -> str:
        return self._at(LOCK_FILE)

    @property
    def manifest(self) -> str:
        return self._at(MANIFEST_FILE)

    # -- representation/ -------------------------------------------------------------------------
    @property
    def representation(self) -> str:
        return self._at(REPRESENTATION_DIR)

    @property
    def representation_meta(self) -> str:
        return self._at(REPRESENTATION_DIR, REPRESENTATION_META)

    @property
    def representation_domain(self) -> str:
        return self._at(REPRESENTATION_DIR, REPRESENTATION_DOMAIN)

    @property
    def representation_private(self) -> str:
        return self._at(REPRESENTATION_DIR, REPRESENTATION_PRIVATE)

    # -- learn/ ----------------------------------------------------------------------------------
    @property
    def learn(self) -> str:
        return self._at(LEARN_DIR)

    @property
    def learn_metrics(self) -> str:
        return self._at(LEARN_DIR, LEARN_METRICS)

    @property
    def learn_outcome(self) -> str:
        return self._at(LEARN_DIR, LEARN_OUTCOME)

    def learn_checkpoint(self, name: str) -> str:
        """A Ray Train checkpoint folder (`epoch_NNNN`) under learn/."""
        return self._at(LEARN_DIR, name)

    # -- synth/ ----------------------------------------------------------------------------------
    @property
    def synth(self) -> str:
        return self._at(SYNTH_DIR)

    @property
    def synth_work(self) -> str:
        return self._at(SYNTH_DIR, _SYNTH_WORK)

    @property
    def synth_records(self) -> str:
        return self._at(SYNTH_DIR, _SYNTH_RECORDS)

    @property
    def synth_manifest(self) -> str:
        return self._at(SYNTH_DIR, MANIFEST_FILE)

    # -- finetune/ -------------------------------------------------------------------------------
    @property
    def finetune(self) -> str:
        return self._at(FINETUNE_DIR)

    def finetune_output(self, kind: str) -> str:
        """`checkpoints`, `adapter`, `model` or `merged` under finetune/."""
        if kind not in FINETUNE_OUTPUTS:
            raise ValueError(f"unknown finetune output {kind!r}; one of {', '.join(FINETUNE_OUTPUTS)}")
        return self._at(FINETUNE_DIR, kind)

    @property
    def finetune_metrics(self) -> str:
        return self._at(FINETUNE_DIR, _FINETUNE_METRICS)

    # -- eval/<name>/ ----------------------------------------------------------------------------
    @property
    def eval(self) -> str:
        return self._at(EVAL_DIR)

    def eval_dir(self, name: str) -> str:
        """One evaluation's folder (`base`, `finetuned`, ...)."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"evaluation name {name!r} must be one non-empty path segment")
        return self._at(EVAL_DIR, name)

    def eval_results(self, name: str) -> str:
        return join_uri(self.eval_dir(name), EVAL_RESULTS)

    def eval_summary(self, name: str) -> str:
        return join_uri(self.eval_dir(name), EVAL_SUMMARY)

    def eval_nll(self, name: str) -> str:
        return join_uri(self.eval_dir(name), EVAL_NLL)

    # -- report/ ---------------------------------------------------------------------------------
    @property
    def report(self) -> str:
        return self._at(REPORT_DIR)

    def report_file(self, name: str) -> str:
        """A file of the report (`report.html`, `metrics.json`, `<plot>.png`, `study.md`, ...)."""
        return self._at(REPORT_DIR, name)

    # -- a study root ----------------------------------------------------------------------------
    @property
    def study(self) -> str:
        return self._at(STUDY_FILE)

    def arm(self, name: str) -> "RunLayout":
        """The run root of one study arm."""
        return RunLayout(self._at(ARMS_DIR, name))

    @property
    def base_run(self) -> "RunLayout":
        """The study sub-run that evaluates the starting model."""
        return RunLayout(self._at(BASE_RUN))
