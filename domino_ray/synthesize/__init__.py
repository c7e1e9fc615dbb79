"""Synthesis (DESIGN.md sections 2, 4, 5): seeds -> draft -> respond -> judge -> execute -> filter ->
Parquet records, as a resumable Ray Data plan. `run_synthesize` is the job; `export.export_records`
writes accepted records for SFT tools. Pure parts (filters, judge parsing, verdicts, blocks) import
no Ray and are tested directly."""

from __future__ import annotations

__all__ = ["run_synthesize", "SynthesisConflict", "SynthesisIncomplete", "export_records"]


def __getattr__(name: str):
    # lazy: `import domino_ray.synthesize.filters` must not pull Ray, transformers or pyarrow.parquet
    if name in ("run_synthesize", "SynthesisConflict", "SynthesisIncomplete"):
        from domino_ray.synthesize import run

        return getattr(run, name)
    if name == "export_records":
        from domino_ray.synthesize.export import export_records

        return export_records
    raise AttributeError(name)
