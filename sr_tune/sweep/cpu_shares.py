"""CPU sharing between the trials of a sweep on this machine: at the end of a sweep, once every trial has
started and none waits, the CPUs of the trials that ended go to the ones still training in their own processes
(``CpuShares`` in the driver writes each one's share, ``ThreadShare`` reads it in the trial, the engine sets
torch's threads between steps)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sr_tune.study import Study
from sr_tune.sweep.search import num_trials


def own_threads(study: Study) -> int:
    return max(1, int(study.resources.cpus_per_worker))


class ThreadShare:
    """In a trial that trains in its own process: how many CPU threads its sweep's driver lets it use, from the
    file ``CpuShares`` writes, read at most twice a second (asking on every step costs a clock read)."""

    def __init__(self, path: Path, own: int) -> None:
        self.path, self.own, self.threads, self.next_read = path, own, own, 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now >= self.next_read:
            self.next_read = now + 0.5
            try:
                self.threads = int(self.path.read_text())
            except FileNotFoundError:
                self.threads = self.own
        return self.threads


class CpuShares:
    """In the sweep's driver, for trials that train in processes on this machine: once every trial has started
    and none waits, the CPUs of the trials that ended go to the running ones, so that the last trials of a
    sweep train on the slots the others left idle instead of one slot each; a trial that waits again (a
    retry, a PBT exploit) takes them back. Each running trial's share is written to its file in ``folder``.

    Threads change a run's float sums: a trial that ends a sweep on more threads is not bit-for-bit the run
    it would be on its own CPUs (its patches and schedule are)."""

    def __init__(self, folder: Path, study: Study, slots: int) -> None:
        self.folder, self.study = folder, study
        self.own, self.cpus = own_threads(study), int(slots * study.resources.cpus_per_worker)
        self.granted: dict[str, int] = {}

    @staticmethod
    def file(folder: Path, trial_id: str) -> Path:
        return folder / f"{trial_id}.threads"

    def clear(self) -> None:
        """Removes the shares written (a resumed sweep starts with every trial on its own CPUs)."""
        for stale in self.folder.glob("*.threads"):
            stale.unlink(missing_ok=True)

    def update(self, trials: list[Any], ended: str | None = None) -> dict[str, int]:
        """Writes the share of each running trial (``ended`` is on its way out); returns those that changed."""
        running = [trial.trial_id for trial in trials if trial.status == "RUNNING" and trial.trial_id != ended]
        share = self.own
        if running and none_left_to_start(self.study, trials):
            share = max(self.own, self.cpus // len(running))
        changed = {}
        for trial_id in running:
            if self.granted.get(trial_id, self.own) != share:
                self.folder.mkdir(parents=True, exist_ok=True)
                partial = self.folder / f".{trial_id}.threads"
                partial.write_text(str(share))
                partial.replace(self.file(self.folder, trial_id))  # the trial reads a whole number or none
                self.granted[trial_id] = changed[trial_id] = share
        return changed


def none_left_to_start(study: Study, trials: list[Any]) -> bool:
    """Every trial of the sweep has started and none waits for a slot: slots freed from now on stay idle."""
    waiting = any(trial.status in ("PENDING", "PAUSED") for trial in trials)
    return not waiting and len(trials) >= num_trials(study)
