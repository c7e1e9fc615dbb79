"""Tests of domino_ray.config: example round trip, key-path errors collected at once, presets, aliases, examples/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from domino_ray.config import (PRESETS, ConfigError, DominoConfig, absolute_local_paths, config_from_dict, dump_config,
                               example_yaml, load_config)

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_example_yaml_loads_back_to_the_defaults(tmp_path):
    text = example_yaml()
    assert config_from_dict(yaml.safe_load(text)).to_dict() == DominoConfig().to_dict()
    # load_config also resolves local paths against the cwd (Ray workers run elsewhere)
    loaded = load_config(write_yaml(tmp_path / "ex.yaml", text))
    assert loaded.to_dict() == absolute_local_paths(DominoConfig()).to_dict()
    assert Path(loaded.run.output).is_absolute() and Path(loaded.backbone.model).is_absolute()


def _fields(model: BaseModel):
    for name, field in type(model).model_fields.items():
        yield field
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _fields(value)


def test_every_field_is_documented_in_the_example():
    text = example_yaml()
    for field in _fields(DominoConfig()):
        assert field.description, "every config field needs a description"
        assert f"# {field.description.strip()}" in text


def test_dump_config_round_trips():
    cfg = config_from_dict({"preset": "tiny", "run": {"name": "x"}, "learn": {"lambda": 0.5}})
    assert config_from_dict(yaml.safe_load(dump_config(cfg))).to_dict() == cfg.to_dict()


def test_unknown_keys_are_named_by_dotted_path(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"learn": {"lamda": 0.5}, "synthesize": {"draft": {"sampling": {"temprature": 1}}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "learn.lamda: unknown key" in msg
    assert "synthesize.draft.sampling.temprature: unknown key" in msg


def test_all_errors_are_collected_in_one_message():
    with pytest.raises(ConfigError) as err:
        config_from_dict({
            "bogus": 1,
            "learn": {"lr": -1, "batch_size": 1, "contrastive": "other"},
            "synthesize": {"draft": {"pool": {"min_actors": 3, "max_actors": 1}}},
            "evaluate": {"k": [5]},
        })
    msg = str(err.value)
    assert "6 problem(s)" in msg
    for path in ("bogus: unknown key", "learn.lr:", "learn.batch_size:", "learn.contrastive:",
                 "synthesize.draft.pool:", "evaluate:"):
        assert f"  - {path}" in msg, path
    assert "max_actors (1) must be >= min_actors (3)" in msg
    assert "k values [5] must be between 1 and num_samples (1)" in msg


def test_presets_fill_only_unset_values():
    tiny = PRESETS["tiny"]
    cfg = config_from_dict({"preset": "tiny", "learn": {"num_domain_tokens": 32},
                            "synthesize": {"draft": {"sampling": {"temperature": 0.3}}}})
    assert cfg.learn.num_domain_tokens == 32  # set in the file: the file wins
    assert cfg.learn.num_sample_tokens == tiny["learn"]["num_sample_tokens"]  # unset: the preset fills it
    assert cfg.synthesize.draft.sampling.temperature == 0.3
    assert cfg.synthesize.draft.sampling.max_tokens == tiny["synthesize"]["draft"]["sampling"]["max_tokens"]
    assert cfg.references.max_tokens == tiny["references"]["max_tokens"]
    assert cfg.learn.tau == DominoConfig().learn.tau  # in neither: the default
    paper = config_from_dict({"preset": "paper", "learn": {"use_gpu": False}})
    assert (paper.learn.num_domain_tokens, paper.learn.use_gpu) == (256, False)


def test_paper_preset_is_the_authors_settings():
    # DESIGN.md section 1: "paper (P = Q = 256, B = 3, 10 epochs, bf16 - the authors' settings for a 7B coder model)"
    learn = config_from_dict({"preset": "paper"}).learn
    assert (learn.num_domain_tokens, learn.num_sample_tokens, learn.batch_size, learn.epochs) == (256, 256, 3, 10)
    assert learn.precision == "bf16" and learn.use_gpu is True
    # and the method's defaults it does not override (DESIGN section 1): lambda = tau = 1, AdamW lr 1e-3, clip 1.0
    assert (learn.lambda_, learn.tau, learn.lr, learn.grad_clip, learn.contrastive) == (1.0, 1.0, 1e-3, 1.0, "paper")
    assert learn.init == "vocab"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'huge'; known: \['paper', 'tiny'\]"):
        config_from_dict({"preset": "huge"})


def test_lambda_alias(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "learn:\n  lambda: 0.0\n"))
    assert cfg.learn.lambda_ == 0.0  # 0 = the L1-only baseline, a supported setting
    assert cfg.to_dict()["learn"]["lambda"] == 0.0 and "lambda_" not in cfg.to_dict()["learn"]
    assert config_from_dict({"learn": {"lambda_": 0.25}}).learn.lambda_ == 0.25
    with pytest.raises(ConfigError, match=r"learn.lambda: Input should be greater than or equal to 0"):
        config_from_dict({"learn": {"lambda": -1}})


def test_output_flag_overrides_run_output(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"run": {"name": "n", "output": "./runs/a"}})
    assert load_config(path).run.output == str(Path.cwd() / "runs" / "a")  # relative -> absolute
    cfg = load_config(path, output="s3://bucket/runs/b")
    assert cfg.run.output == "s3://bucket/runs/b" and cfg.run.name == "n"
    assert load_config(write_yaml(tmp_path / "e.yaml", ""), output="/tmp/o").run.output == "/tmp/o"


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write_yaml(tmp_path / "broken.yaml", "learn: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got list"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        config_from_dict([1, 2])
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")).to_dict() == absolute_local_paths(DominoConfig()).to_dict()


# Recursive: configs in subfolders are checked too (torchtune's config test missed those). An empty
# examples/ gives one skipped test.
EXAMPLE_CONFIGS = sorted((REPO / "examples").rglob("*.yaml")) + sorted((REPO / "examples").rglob("*.yml"))


def _leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=[str(p.relative_to(REPO)) for p in EXAMPLE_CONFIGS])
def test_every_example_config_loads_with_the_values_it_sets(path):
    data = yaml.safe_load(path.read_text())
    loaded = load_config(path).to_dict()
    checked = 0
    for keys, value in _leaves(data):
        if keys == ("preset",):
            continue
        got = loaded
        for key in keys:
            got = got[key]
        if isinstance(value, str) and value.startswith("builtin:"):  # resolved to its node-local folder
            assert Path(got).is_absolute() and Path(got).name == value.split(":", 1)[1], (keys, got)
        elif isinstance(value, str) and value.startswith("./"):  # local paths resolved against the cwd
            assert got == str(Path.cwd() / value), (keys, got)
        else:
            assert got == value, (keys, got, value)  # the file's value, never a preset's or a default
        checked += 1
    assert checked >= 5
    if "preset" in data:  # the preset fills what the file leaves unset
        preset = PRESETS[data["preset"]]
        for keys, value in _leaves(preset):
            node = data
            for key in keys:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if node == {}:
                got = loaded
                for key in keys:
                    got = got[key]
                assert got == value, (keys, got, value)



def test_a_section_given_in_part_keeps_its_stage_defaults():
    """respond/judge engines default to the chat template, the judge to greedy sampling, the execute pool
    to 0.25 CPU: giving one other key of those sections must not reset the rest to the class defaults
    (it did: `respond.engine: {kind: hf}` sent raw text to an instruct model)."""
    cfg = config_from_dict({"synthesize": {
        "respond": {"engine": {"kind": "hf"}, "sampling": {"max_tokens": 100}},
        "judge": {"engine": {"max_model_len": 1536}, "sampling": {"max_tokens": 8}},
        "execute": {"pool": {"batch_size": 4}},
        "draft": {"engine": {"kind": "hf"}}}})
    syn = cfg.synthesize
    assert (syn.respond.engine.kind, syn.respond.engine.chat_template) == ("hf", True)
    assert (syn.respond.sampling.max_tokens, syn.respond.sampling.temperature) == (100, 0.2)
    assert (syn.judge.engine.max_model_len, syn.judge.engine.chat_template) == (1536, True)
    assert (syn.judge.sampling.max_tokens, syn.judge.sampling.temperature) == (8, 0.0)
    assert (syn.execute.pool.batch_size, syn.execute.pool.num_cpus) == (4, 0.25)
    assert syn.draft.engine.chat_template is False  # the soft-prompt engine stays raw
    explicit = config_from_dict({"synthesize": {"respond": {"engine": {"chat_template": False}}}})
    assert explicit.synthesize.respond.engine.chat_template is False  # a key given wins
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({"synthesize": {"respond": {"engine": {"bogus": 1}}}})
