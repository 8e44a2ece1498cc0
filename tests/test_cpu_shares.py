"""A sweep's last trials take over the CPUs of ended ones: the driver's shares (with Tune's own ``Trial``
objects, no Ray started), the trial's reading of them, and the engine following them between steps."""

from __future__ import annotations

from pathlib import Path

import torch
from ray.tune.experiment import Trial

from sr_tune.config import load_config
from sr_tune.engine import train
from sr_tune.study import load_study
from sr_tune.sweep.cpu_shares import CpuShares, ThreadShare

from .conftest import REPO
from .conftest import write_sweep_study as write_study


def trials(*statuses: str) -> list[Trial]:
    made = []
    for status in statuses:
        trial = Trial("trainable", stub=True)
        trial.set_status(status)
        made.append(trial)
    return made


def study_of(tmp_path: Path, num_samples: int, cpus_per_worker: int = 1):
    return load_study(
        write_study(
            tmp_path,
            f"""
name: shares
search:
  optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}
budget: {{num_samples: {num_samples}, max_steps: 40}}
resources: {{workers: 1, cpus_per_worker: {cpus_per_worker}}}
""",
        )
    )


def test_the_last_trials_share_the_slots_of_ended_ones_and_give_them_back_when_one_waits(tmp_path: Path):
    shares = CpuShares(tmp_path / "runs", study_of(tmp_path, num_samples=3), slots=2)
    a, b, c = trials(Trial.RUNNING, Trial.RUNNING, Trial.PENDING)
    read_c = ThreadShare(CpuShares.file(tmp_path / "runs", c.trial_id), own=1)

    assert shares.update([a, b]) == {}  # the searcher has not made every trial yet
    assert shares.update([a, b, c], ended=a.trial_id) == {}  # c waits for a's slot
    a.set_status(Trial.TERMINATED)
    c.set_status(Trial.RUNNING)
    assert shares.update([a, b, c]) == {}  # every trial started, two running on two slots: one each
    assert read_c() == 1 and not (tmp_path / "runs").exists()

    assert shares.update([a, b, c], ended=b.trial_id) == {c.trial_id: 2}  # c alone: both slots
    assert CpuShares.file(tmp_path / "runs", c.trial_id).read_text() == "2"
    assert read_c() == 1  # read at most twice a second
    read_c.next_read = 0.0
    assert read_c() == 2
    assert shares.update([a, b, c], ended=b.trial_id) == {}  # nothing new to write

    b.set_status(Trial.PENDING)  # b failed and Tune retries it: c gives the slot back
    assert shares.update([a, b, c]) == {c.trial_id: 1}
    read_c.next_read = 0.0
    assert read_c() == 1

    shares.clear()  # a resumed sweep starts with every trial on its own CPUs
    assert list((tmp_path / "runs").iterdir()) == []
    read_c.next_read = 0.0
    assert read_c() == 1


def test_shares_are_whole_threads_of_the_sweeps_slots(tmp_path: Path):
    shares = CpuShares(tmp_path / "runs", study_of(tmp_path, num_samples=5, cpus_per_worker=2), slots=4)
    running = trials(Trial.TERMINATED, Trial.TERMINATED, *[Trial.RUNNING] * 3)
    # 4 slots of 2 CPUs among 3 running trials: 2 each (8 // 3), never less than their own 2.
    assert shares.update(running) == {}
    running[2].set_status(Trial.TERMINATED)
    assert shares.update(running) == {running[3].trial_id: 4, running[4].trial_id: 4}


def test_training_follows_the_threads_it_is_given_between_steps(tmp_path: Path):
    config = load_config(
        REPO / "configs" / "smoke.yaml",
        ["training.device=cpu", "data.val_crop=48", "training.steps=6", "training.eval_interval=6"],
    )
    asked: list[int] = []

    def threads() -> int:
        asked.append(torch.get_num_threads())
        return 1 if len(asked) < 4 else 2

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(config, checkpoint_dir=tmp_path / "run", threads=threads)
        # Asked before each of the 6 steps; steps 4 to 6 ran on the 2 threads it was given.
        assert asked == [1, 1, 1, 1, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
