"""Study files: every shipped one loads; bad ones are refused with every problem named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sr_tune.fields import ConfigError
from sr_tune.study import Distribution, load_study

from .conftest import REPO

STUDIES = sorted((REPO / "search_spaces").glob("*.yaml"))


def test_the_shipped_studies_cover_the_product():
    names = {load_study(path).name for path in STUDIES}  # a user's own studies there may come beside them
    assert names >= {
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
    for key, dist in study.search.items():
        for value in dist.extremes():
            config = study.trial_config({key: value})
            section, _, name = key.partition(".")
            got = getattr(config, section)
            for part in name.split("."):
                got = got[part] if isinstance(got, dict) else getattr(got, part)
            assert got == value


def write_study(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'smoke.yaml'}\n" + body)
    return path


def test_one_load_reports_every_problem_of_a_study_with_did_you_mean(tmp_path: Path):
    # Fifteen problems across every part of the file: unknown keys, wrong types, bad bounds, names that are
    # not the allowed ones, search keys the training config does not have or values it refuses, and an
    # objective (VGG54) that a run without an adversarial loss never reports. One load names them all.
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
objective: {metric: val_vgg54, mode: maximum}
sampler: {name: tpee, seed: -1}
scheduler: {name: hyperband, reduction_factor: "two"}
budget: {num_samples: 0, max_step: 100}
resources: {workers: 0, gpus_per_worker: 2}
""",
    )
    with pytest.raises(ConfigError) as raised:
        load_study(path)
    message = str(raised.value)
    expected = [
        "colour: unknown key",
        "search.optimizer.lrr = 0.0001: optimizer.lrr: unknown key (did you mean 'lr'?",
        "search.optimizer.weight_decay.low: 0.0 must be > 0 for loguniform",
        "search.data.batch_size.low: 64 must be below high 16",
        "search.loss.pixel = 'l3': loss.pixel: 'l3' is not valid",
        "objective.metric: 'val_vgg54' is not reported by the runs of this study",
        "objective.mode: 'maximum' is not valid (expected did you mean 'max'?",
        "sampler.name: 'tpee' is not valid (expected did you mean 'tpe'?",
        "sampler.seed: -1 is out of range (allowed: >= 0)",
        "scheduler.name: 'hyperband' is not valid",
        "scheduler.reduction_factor: 'two' is not valid",
        "budget.max_step: unknown key (did you mean 'max_steps'?",
        "budget.num_samples: 0 is out of range (allowed: >= 1)",
        "resources.workers: 0 is out of range (allowed: >= 1)",
        "resources.gpus_per_worker: 2",
    ]
    missing = [line for line in expected if line not in message]
    assert not missing, message
    assert str(path) in message and raised.value.problems == list(dict.fromkeys(raised.value.problems))
    assert len(raised.value.problems) == len(expected)


def test_an_objective_is_accepted_only_where_its_runs_report_it(tmp_path: Path, vgg_cache: Path):
    # VGG distances are computed in adversarial runs only: the same objective is fine on an SRGAN base.
    body = "name: gan\nsearch: {optimizer.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}}\n"
    body += "objective: {metric: val_vgg54, mode: min}\n"
    gan = tmp_path / "gan.yaml"
    gan.write_text(f"base: {REPO / 'configs' / 'srgan_x4.yaml'}\n{body}")
    assert load_study(gan).objective.metric == "val_vgg54"
    with pytest.raises(ConfigError, match="'val_vgg54' is not reported by the runs of this study"):
        load_study(write_study(tmp_path, body))
    with pytest.raises(ConfigError, match="did you mean 'val_psnr'"):
        load_study(write_study(tmp_path, body.replace("val_vgg54", "val_pnsr")))


def test_a_missing_base_and_required_keys_are_named(tmp_path: Path):
    path = tmp_path / "study.yaml"
    path.write_text("base: nowhere.yaml\nfixed: {optimizer.lr: -1}\n")
    with pytest.raises(ConfigError) as raised:
        load_study(path)
    assert "name: required" in str(raised.value) and "search: required" in str(raised.value)
    assert "base: 'nowhere.yaml' cannot be read" in str(raised.value)


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
    lr = Distribution(type="loguniform", low=1e-4, high=1e-2)
    assert lr.edge(1.2e-4) == "low" and lr.edge(1e-3) is None and lr.edge(0.009) == "high"
    strength = Distribution(type="uniform", low=0.0, high=1.0, step=0.25)
    assert strength.grid() == [0.0, 0.25, 0.5, 0.75, 1.0] and strength.edge(0.95) == "high"
    assert Distribution(type="int", low=2, high=5).grid() == [2, 3, 4, 5]
    assert lr.grid() == pytest.approx([1e-4, 1e-3, 1e-2])


def test_what_a_sweep_sets_from_the_study_cannot_be_fixed_or_searched(tmp_path: Path):
    path = write_study(
        tmp_path,
        """
name: owned
fixed: {distributed.num_workers: 2, distributed.storage_path: /elsewhere}
search:
  distributed.keep_checkpoints: {type: choice, values: [1, 2]}
""",
    )
    with pytest.raises(ConfigError) as refused:
        load_study(path)
    assert sorted(refused.value.problems) == [
        "fixed.distributed.num_workers: a sweep sets it from the study's resources.workers; set that instead",
        "fixed.distributed.storage_path: a sweep sets it from the study's storage (or --storage); set that instead",
        "search.distributed.keep_checkpoints: a sweep sets it from the study's keep_checkpoints; set that instead",
    ]


def test_the_base_config_is_built_once():
    study = load_study(REPO / "search_spaces" / "quickstart.yaml")
    assert study.base_config is study.base_config and study.base_config.model.name == "srcnn_915"


def test_an_asha_study_whose_first_rung_lies_past_its_budget_is_refused():
    path = REPO / "search_spaces" / "srcnn_optimizer.yaml"
    with pytest.raises(ConfigError) as refused:
        load_study(path, ["budget.max_steps=1000"])  # grace_period 2000
    assert refused.value.problems == [
        "scheduler.grace_period: 2000 steps is past budget.max_steps 1000: ASHA's first rung would never come; "
        "lower it (e.g. scheduler.grace_period=500)"
    ]
    assert load_study(path, ["budget.max_steps=1000", "scheduler.grace_period=500"]).budget.max_steps == 1000


def test_the_final_run_splits_the_winning_batch_evenly_over_the_free_cpus(tmp_path: Path):
    from sr_tune.sweep.final import final_config, final_workers

    assert [final_workers(batch, 4) for batch in (32, 6, 9, 7, 1)] == [4, 3, 3, 1, 1]
    assert final_workers(16, 0) == 1
    study = load_study(
        write_study(
            tmp_path,
            """
name: final
fixed: {data.batch_size: 16, training.eval_interval: 50}
search:
  data.batch_size: {type: choice, values: [16, 48]}
budget: {max_steps: 200, final_steps: 1000}  # 5x: evaluated every 5 x 50 steps
""",
        )
    )
    for batch, slots, workers, steps, interval in ((16, 2, 2, 1000, 250), (48, 2, 2, 334, 84), (48, 5, 4, 334, 84)):
        config = final_config(study, {"data.batch_size": batch}, slots)
        assert config.distributed.num_workers == workers and config.data.batch_size * workers == batch
        assert (config.training.steps, config.training.eval_interval) == (steps, interval)
    with pytest.raises(ConfigError) as refused:
        load_study(study.path, ["budget.final_steps=-1"])
    assert [p for p in refused.value.problems if "final_steps" in p] == [
        "budget.final_steps: -1 is out of range (allowed: >= 0) (from the override 'budget.final_steps=-1')"
    ]


def test_a_share_of_a_gpu_is_for_one_worker_trials(tmp_path: Path):
    path = REPO / "search_spaces" / "fsrcnn.yaml"
    assert load_study(path, ["resources.gpus_per_worker=0.25"]).resources.gpus_per_worker == 0.25
    with pytest.raises(ConfigError) as refused:
        load_study(path, ["resources.gpus_per_worker=0.5", "resources.workers=2"])
    assert refused.value.problems == [
        "resources.gpus_per_worker: a share of a GPU (0.5) is for one-worker trials (the DDP workers of one trial "
        "each need a GPU of their own); set resources.workers=1 or resources.gpus_per_worker=1 (from the override "
        "'resources.gpus_per_worker=0.5')"
    ]
    with pytest.raises(ConfigError) as refused:
        load_study(path, ["resources.gpus_per_worker=2"])
    assert [p.split(" (from")[0] for p in refused.value.problems] == [
        "resources.gpus_per_worker: 2.0 is not supported (allowed: 0, 1 (one GPU per DDP worker) or a share of one "
        "GPU, e.g. 0.25)"
    ]


def test_the_final_run_is_registered_only_when_it_beats_the_best_trial(tmp_path: Path):
    from sr_tune.summary import TrialSummary
    from sr_tune.sweep.final import final_wins

    def scored(name: str, value: float | None) -> TrialSummary:
        best = {"val_psnr": value} if value is not None else {}
        return TrialSummary(
            trial_id=name,
            name=name,
            params={},
            best=best,
            patches_seen=0,
            stopped_early=False,
            error=None,
            run_id=None,
            best_checkpoint=None,
            latest_checkpoint=None,
        )

    study = load_study(REPO / "search_spaces" / "quickstart.yaml")
    winner = scored("t05", 33.47)
    assert final_wins(
        study,
        scored(
            "final",
            33.5,
        ),
        winner,
    )
    assert not final_wins(study, scored("final", 33.14), winner)  # photo_x2's final run, measured: the trial stays
    assert not final_wins(study, scored("final", None), winner) and not final_wins(study, None, winner)
    minimised = load_study(REPO / "search_spaces" / "quickstart.yaml", ["objective.mode=min"])
    assert final_wins(minimised, scored("final", 33.14), winner)
