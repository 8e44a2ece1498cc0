"""Study files: every shipped one loads; bad ones are refused with every problem named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sr_tune.config import ConfigError
from sr_tune.study import Distribution, load_study

from .conftest import REPO

STUDIES = sorted((REPO / "search_spaces").glob("*.yaml"))


def test_the_shipped_studies_cover_the_product():
    names = {load_study(path).name for path in STUDIES}
    assert names == {
        "quickstart",
        "srcnn_optimizer",
        "fsrcnn",
        "vdsr",
        "srresnet",
        "srgan_loss_weights",
        "augmentation_l2",
        "batch_size",
    }


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_loads_and_each_extreme_makes_a_valid_config(path: Path):
    study = load_study(path)
    assert study.search and study.text == path.read_text()
    for dist in study.search:
        for value in dist.values if dist.kind == "choice" else (dist.low, dist.high):
            config = study.trial_config({dist.key: value})
            section, _, key = dist.key.partition(".")
            got = getattr(config, section)
            for part in key.split("."):
                got = got[part] if isinstance(got, dict) else getattr(got, part)
            assert got == value


def write_study(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'smoke.yaml'}\n" + body)
    return path


def test_unknown_keys_and_bad_ranges_are_all_reported_with_their_names(tmp_path: Path):
    path = write_study(
        tmp_path,
        """
name: broken
colour: red
search:
  optimizer.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  optimizer.weight_decay: {type: loguniform, low: 0.0, high: 1.0e-2}
  data.batch_size: {type: int, low: 64, high: 16}
  loss.pixel: {type: choice, values: [mse, l3]}
scheduler: {name: hyperband}
budget: {num_samples: 4, max_step: 100}
""",
    )
    with pytest.raises(ConfigError) as raised:
        load_study(path)
    message = str(raised.value)
    assert str(path) in message
    for expected in (
        "colour: unknown key",
        "budget.max_step: unknown key",
        "search.optimizer.weight_decay.low: 0.0 must be > 0",
        "search.data.batch_size: low 64 must be below",
    ):
        assert expected in message, expected
    # Problems with the study's own keys come first; once those are fixed, the training-config checks
    # name the search key the config does not have, and the value it refuses.
    path = write_study(
        tmp_path,
        """
name: broken
search:
  optimizer.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  loss.pixel: {type: choice, values: [mse, l3]}
scheduler: {name: hyperband}
""",
    )
    with pytest.raises(ConfigError) as raised:
        load_study(path)
    message = str(raised.value)
    assert "search.optimizer.lrr = 0.0001: optimizer.lrr: unknown key" in message
    assert "search.loss.pixel = 'l3': loss.pixel" in message
    assert "scheduler.name: 'hyperband'" in message


def test_pbt_refuses_structural_keys_and_model_based_samplers(tmp_path: Path):
    path = write_study(
        tmp_path,
        """
name: pbt
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  data.batch_size: {type: choice, values: [8, 16]}
scheduler: {name: pbt}
""",
    )
    with pytest.raises(ConfigError) as raised:
        load_study(path)
    assert "search.data.batch_size: PBT can only change" in str(raised.value)
    assert "sampler.name: PBT draws its start points at random" in str(raised.value)


def test_trials_of_other_batch_sizes_see_the_same_patches(tmp_path: Path):
    study = load_study(
        write_study(
            tmp_path,
            """
name: batch
fixed: {data.batch_size: 16, training.eval_interval: 50}
search:
  data.batch_size: {type: choice, values: [16, 48, 64]}
budget: {max_steps: 200}
resources: {workers: 2}
""",
        )
    )
    for batch, steps, interval in ((16, 200, 50), (64, 50, 13), (48, 67, 17)):
        config = study.trial_config({"data.batch_size": batch})
        assert (config.training.steps, config.training.eval_interval) == (steps, interval)
        assert config.training.steps * batch >= 200 * 16  # rounded up: never short of the budget
        assert config.distributed.num_workers == 2
    assert study.patches(200) == 200 * 16 * 2


def test_edges_and_grids():
    lr = Distribution(key="optimizer.lr", kind="loguniform", low=1e-4, high=1e-2)
    assert lr.edge(1.2e-4) == "low" and lr.edge(1e-3) is None and lr.edge(0.009) == "high"
    strength = Distribution(key="data.augment_strength", kind="uniform", low=0.0, high=1.0, step=0.25)
    assert strength.grid() == [0.0, 0.25, 0.5, 0.75, 1.0] and strength.edge(0.95) == "high"
    assert Distribution(key="m", kind="int", low=2, high=5).grid() == [2, 3, 4, 5]
    assert lr.grid() == pytest.approx([1e-4, 1e-3, 1e-2])
