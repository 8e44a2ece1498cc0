"""Trials that ask for a share of a GPU, on a local Ray that advertises one GPU. This machine has none: to
Ray a GPU is a resource it counts and places by (it gives each trial's process the GPU's id), so the
placement is real while the trials train on the CPU (``training.device: cpu``). A Ray file
(conftest.RAY_FILES): its Ray runs alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import ray

from sr_tune.distributed import init_ray
from sr_tune.study import load_study
from sr_tune.sweep.driver import run_sweep
from sr_tune.sweep.final import final_config, final_slots
from sr_tune.sweep.search import max_concurrent_trials, runs_in_trial, trial_resources

from .conftest import mlflow_runs
from .conftest import write_sweep_study as write_study

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    init_ray(num_cpus=8, num_gpus=1, dashboard=False)
    yield
    ray.shutdown()


def test_a_quarter_gpu_per_trial_places_four_trials_on_the_gpu_at_once(tmp_path: Path, ray_with_one_gpu):
    study = load_study(
        write_study(
            tmp_path,
            """
name: shares
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
sampler: {name: random, seed: 0}
scheduler: {name: none}
budget: {num_samples: 6, max_steps: 120}
resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.25}
""",  # write_study fixes training.device: cpu
        )
    )
    assert runs_in_trial(study) and trial_resources(study) == {"CPU": 1, "GPU": 0.25}
    assert max_concurrent_trials(study) == 4  # the 8 CPUs would hold 8 trials; the GPU's quarters, 4
    # A final run would take the whole GPU the four trials shared, as one worker.
    assert final_slots(study) == 1
    with_final = replace(study, budget=replace(study.budget, final_steps=240))
    final = final_config(with_final, {"optimizer.lr": 1e-3}, final_slots(with_final))
    assert final.distributed.num_workers == 1 and final.distributed.use_gpu

    result = run_sweep(study, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    assert len(result.trials) == 6 and all(t.error is None for t in result.trials)
    client, runs = mlflow_runs(tmp_path)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(trials) == 6
    assert {r.data.tags.get("sr_tune.gpu_ids") for r in trials} == {"0"}  # every trial's process held GPU 0
    # When each trial trained: from its first evaluation to its last (logged by the trial itself).
    spans = []
    for run in trials:
        times = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "val_psnr"))
        assert len(times) == 6
        spans.append((times[0], times[-1]))
    at_once = [sum(1 for start, end in spans if start <= moment <= end) for moment, _ in spans]
    assert max(at_once) == 4  # four quarters on the one GPU, never a fifth
