"""Engine selection, sampling-parameter checks and lazy imports (no model needed)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from domino_ray.engines import EngineError, SamplingParams, select_engine_kind
from domino_ray.engines.base import derive_seed


def test_explicit_hf_needs_no_vllm():
    assert select_engine_kind("hf") == ("hf", "engine.kind is hf")


def test_auto_picks_vllm_when_it_can_run_here_and_says_why():
    from domino_ray.engines.vllm import vllm_usable

    usable, reason = vllm_usable()
    kind, why = select_engine_kind("auto")
    assert kind == ("vllm" if usable else "hf")
    assert reason in why


def test_unknown_kind_is_refused():
    with pytest.raises(EngineError, match="auto, vllm or hf"):
        select_engine_kind("tgi")


def test_build_engine_logs_the_choice(tiny_model_dir, caplog):
    from domino_ray.config import BackboneConfig, EngineConfig
    from domino_ray.engines import build_engine

    with caplog.at_level(logging.INFO, logger="domino_ray.engines"):
        engine = build_engine(EngineConfig(kind="hf", max_model_len=256), BackboneConfig(model=str(tiny_model_dir)))
    assert engine.kind == "hf" and engine.max_model_len == 256
    assert engine.describe()["dtype"] == "float32"
    assert any("engine: hf" in r.message and "engine.kind is hf" in r.message for r in caplog.records)
    engine.shutdown()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must be"),
        ({"stop": [""]}, "stop strings"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(EngineError, match=message):
        SamplingParams(**kwargs)


def test_sampling_from_config_dump():
    from domino_ray.config import SamplingConfig

    sp = SamplingParams.from_dict(SamplingConfig(stop=["\n\n"]).model_dump(), seed=3)
    assert (sp.temperature, sp.max_tokens, sp.stop, sp.seed) == (0.8, 256, ["\n\n"], 3)
    assert SamplingParams(stop="###").stop == ["###"]
    with pytest.raises(EngineError, match="unknown sampling keys"):
        SamplingParams.from_dict({"temprature": 1.0})


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, 0) == 7
    assert derive_seed(7, 1) == derive_seed(7, 1) != derive_seed(8, 1)
    assert len({derive_seed(7, j) for j in range(100)}) == 100


def test_importing_engines_and_stage_loads_no_heavy_library():
    code = ("import sys, domino_ray.engines, domino_ray.engines.stage; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
