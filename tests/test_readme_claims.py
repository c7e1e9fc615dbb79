"""README claims that had no test of their own (issue 16's list); the others are pinned elsewhere:
engine.cpu_kv_cache_gb (engines/test_vllm.py::test_kv_cache_is_sized_by_cpu_kv_cache_gb), LoRA from
s3:// (engines/test_s3_models.py), `domino backbone tiny` (test_cli_basics.py), `domino evaluate
--model/--lora` (evaluate/test_job.py), storage.s3.profile (test_storage.py), the paper preset's
P, Q, B, epochs, bf16 and method defaults (test_config.py)."""

from __future__ import annotations

from domino_ray.config import config_from_dict


def test_paper_preset_chunks_m_by_memory_and_a_file_value_wins():
    # README: "`learn.chunk_rows: auto` (the `paper` preset's setting)"
    assert config_from_dict({"preset": "paper"}).learn.chunk_rows == "auto"
    assert config_from_dict({"preset": "paper", "learn": {"chunk_rows": 2}}).learn.chunk_rows == 2
    assert config_from_dict({}).learn.chunk_rows == 0  # without the preset: all B^2 rows at once
