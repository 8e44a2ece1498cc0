"""Typed configs: every shipped YAML loads; bad input gives one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from sr_tune.config import TrainConfig, load_config
from sr_tune.fields import ConfigError
from sr_tune.models import create_model, list_models
from sr_tune.models.registry import argument_bounds
from sr_tune.study import load_study

from .conftest import REPO

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))  # study files: tests/test_study.py


def test_there_are_shipped_configs():
    assert any(p.parent.name == "configs" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads(path):
    config = load_config(path)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_overrides_are_typed_and_nested():
    config = load_config(
        REPO / "configs" / "smoke.yaml",
        ["optimizer.lr=1e-4", "model.name=vdsr", "model.kwargs.depth=10", "data.color=rgb"],
    )
    assert config.optimizer.lr == 1e-4 and isinstance(config.optimizer.lr, float)
    assert config.model.kwargs == {"depth": 10}
    assert config.in_channels == 3
    assert config.training.steps == 1000  # untouched values come from the file


def test_exponent_numbers_without_a_dot_are_numbers_in_files_and_overrides_alike(tmp_path: Path):
    # YAML 1.1 (PyYAML) reads 1e-3 and -.5 as text; inside a mapping-typed key nothing converted them back.
    path = tmp_path / "exponents.yaml"
    path.write_text("optimizer:\n  lr: 2e-3\nloss:\n  pixel: l1\n  mix: {mse: 5E-2}\n")
    overrides = [
        "delta_stn.enabled=true",
        "delta_stn.pixel_mix={charbonnier: [1e-1, 1e-3, 1e1]}",
        "delta_stn.l2=[1e-6,1e-9,1e-2]",
    ]
    config = load_config(path, overrides)
    assert config.optimizer.lr == 2e-3 and config.loss.mix == {"mse": 0.05}
    assert config.delta_stn.pixel_mix == {"charbonnier": [0.1, 0.001, 10.0]}
    assert config.delta_stn.l2 == (1e-6, 1e-9, 1e-2)
    assert load_config(None, ["data.augment_strength=.5"]).data.augment_strength == 0.5


def test_a_pixel_mix_that_is_not_three_numbers_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["delta_stn.enabled=true", "delta_stn.pixel_mix={mse: [0.1, low, 10], l1: 0.5}"])
    (problem,) = caught.value.problems
    assert problem.startswith("delta_stn.pixel_mix: ")
    assert "mse: [0.1, 'low', 10] is not [initial, low, high]" in problem


def test_every_problem_is_reported_at_once(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  name: srcnn915\n  scale: 5\n  kwargs: {in_channels: 3}\n"
        "data:\n  colour: y\n  batch_size: 2.5\n  lr_patch_size: 2\n"
        "optimizer:\n  lr: -1\n  betas: [0.9]\n  name: lamb\n"
        "training:\n  device: tpu\n  steps: 0\n"
        "tracking: nope\n"
        "extra: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(bad, ["loss.pixel=l3", "oops"])
    error = caught.value
    assert str(bad) in str(error)
    expected = [
        "override 'oops': expected section.key=value",
        "model.name: 'srcnn915' is not a registered model (did you mean 'srcnn_915'?)",
        "model.scale: 5 is not supported (allowed: 2, 3, 4)",
        "model.kwargs: {'in_channels': 3} sets in_channels: set data.color",
        "data.colour: unknown key (did you mean 'color'?",
        "data.batch_size: 2.5 is not valid (expected int)",
        "data.lr_patch_size: 2 is out of range (allowed: >= 4)",
        "optimizer.lr: -1.0 is out of range (allowed: > 0.0 and <= 10.0)",
        "optimizer.betas: [0.9] is not valid (expected 2 values)",
        "optimizer.name: 'lamb' is not valid (expected one of 'adam', 'adamw', 'sgd', 'rmsprop')",
        "loss.pixel: 'l3' is not valid",
        "training.device: 'tpu' is not valid (allowed: auto, cpu, cuda, cuda:N)",
        "training.steps: 0 is out of range (allowed: >= 1)",
        "tracking: expected a mapping of keys, got 'nope'",
        "extra: unknown key",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in error.problems), (fragment, error.problems)
    assert len(error.problems) == len(expected)


def test_model_kwargs_are_checked_against_the_builder():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["model.name=vdsr", "model.kwargs.depth=deep", "model.kwargs.width=32"])
    assert caught.value.problems == [
        "model.kwargs.depth: 'deep' is not valid (expected int) (from the override 'model.kwargs.depth=deep')",
        "model.kwargs.width: vdsr has no argument 'width' (allowed: depth) (from the override 'model.kwargs.width=32')",
    ]


BOUNDED_ARGUMENTS = [(name, key, bound) for name in list_models() for key, bound in argument_bounds(name).items()]


def test_every_count_argument_of_the_zoo_is_bounded():
    assert {(name, key) for name, key, _ in BOUNDED_ARGUMENTS} >= {
        ("fsrcnn", "m"),
        ("fsrcnn", "d"),
        ("fsrcnn", "s"),
        ("vdsr", "depth"),
        ("srresnet", "num_blocks"),
        ("edsr_baseline", "res_scale"),
        ("cnn_small", "out_channels"),
    }


@pytest.mark.parametrize(("name", "key", "bound"), BOUNDED_ARGUMENTS, ids=lambda v: str(getattr(v, "minimum", v)))
def test_model_kwargs_below_their_bound_are_refused_by_the_config_and_by_create_model(name, key, bound):
    color = "rgb" if name in ("edsr_baseline", "srresnet", "srcnn_ex") else "y"
    below = bound.minimum if bound.exclusive else bound.minimum - 1
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"model.name={name}", f"data.color={color}", f"model.kwargs.{key}={below:g}"])
    (problem,) = caught.value.problems
    assert problem.startswith(f"model.kwargs.{key}: ") and "is out of range (allowed: " in problem
    assert problem.endswith(f"(from the override 'model.kwargs.{key}={below:g}')")
    with pytest.raises(ValueError, match=f"{key}: .* is out of range"):
        create_model(name, scale=2, **{key: below})
    lowest = 1 if bound.exclusive else int(bound.minimum)
    at_bound = load_config(None, [f"model.name={name}", f"data.color={color}", f"model.kwargs.{key}={lowest}"])
    assert at_bound.model.kwargs == {key: lowest}


def test_a_problem_set_by_an_override_is_not_blamed_on_the_config_file():
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "configs" / "smoke.yaml", ["optimizer.lr=-1", "data.batch_size=x"])
    assert caught.value.source == f"{REPO / 'configs' / 'smoke.yaml'} and its command-line overrides"
    assert caught.value.problems == [
        "data.batch_size: 'x' is not valid (expected int) (from the override 'data.batch_size=x')",
        "optimizer.lr: -1.0 is out of range (allowed: > 0.0 and <= 10.0) (from the override 'optimizer.lr=-1')",
    ]


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml") as caught:
        load_config(broken)
    assert "not valid YAML" in caught.value.problems[0]
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listed)


def test_configs_are_frozen_and_validated_when_built_in_code():
    config = load_config()
    with pytest.raises(AttributeError):
        config.optimizer.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="lr: 0.0 is out of range"):
        type(config.optimizer)(lr=0.0)


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_has_example_configs_at_each_scale(name: str):
    for scale in (2, 3, 4):
        config = load_config(REPO / "configs" / f"{name}_x{scale}.yaml")
        assert (config.model.name, config.model.scale) == (name, scale)
        assert config.data.lr_patch_size * scale >= 16


def test_a_key_given_twice_is_refused_with_both_lines_in_configs_and_studies(tmp_path: Path):
    config = tmp_path / "twice.yaml"
    config.write_text("optimizer:\n  lr: 1.0e-3\n  name: adam\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match="twice.yaml") as caught:
        load_config(config)
    assert caught.value.problems == ["not valid YAML: line 4, column 3: duplicate key 'lr' (first on line 2)"]
    study = tmp_path / "study.yaml"
    study.write_text(f"name: a\nbase: {REPO / 'configs' / 'smoke.yaml'}\nname: b\n")
    with pytest.raises(ConfigError, match="line 3, column 1: duplicate key 'name' \\(first on line 1\\)"):
        load_study(study)
    with pytest.raises(ConfigError, match=r"base: .*twice.yaml: not valid YAML: line 4, column 3: duplicate key"):
        study.write_text(f"name: a\nbase: {config}\nsearch: {{}}\n")
        load_study(study)


def test_yaml_errors_give_the_line_and_an_empty_config_is_refused_with_a_hint(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: srcnn_915\n scale: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml") as caught:
        load_config(broken)
    assert caught.value.problems[0].startswith("not valid YAML: line 3, column 2: ")
    assert "<unicode string>" not in str(caught.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="the file is empty: .*`sr-tune config > FILE`"):
        load_config(empty)
