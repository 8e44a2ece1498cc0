"""What a sweep spends besides training: the quickstart's wall time against the seconds its trials trained.

Runs ``sr-tune tune`` on a study exactly as a user does (a fresh local Ray, MLflow in a SQLite file, a
fresh folder each time), with this checkout and, given ``--baseline REV``, with that git revision (a
worktree on ``PYTHONPATH``), alternating runs so that noise hits both. For each run:

- wall: the command's whole run, from start to exit (Ray start, trial starts, training, MLflow, summary);
- trained: the slot-seconds the trials' training loops ran (steps and validation), summed over trials, from
  each trial's latest checkpoint; a trial the sweep gave more CPU threads at its end (its run's
  ``cpu_threads`` points) counts as that many slots from then until its last evaluation;
- overhead: 1 - trained / (wall x concurrent trials), the share of the sweep's CPU slots not spent training;
- first eval: seconds from the parent MLflow run's start to the first evaluation any trial logged;
- where the slots' time went, from the MLflow runs' start and end times: before the sweep's parent run opened
  (imports, Ray's start), inside trial runs but not training (a trial's set-up, its reports and checkpoints),
  between trial runs (a trial process's start, a slot with nothing to run, e.g. the last trial alone, less
  the slot-seconds trials trained in slots they took over), and after the last trial ended (the sweep's
  summary, curves and registered model, Ray's stop).

    python benchmarks/ray_overhead.py [--quick] [--baseline REV] [--repeats N]

``--quick``: 4 trials x 20 steps of the smoke SRCNN (about 1.5 min a run on 2 CPUs, 3 min for b8ff40b);
otherwise the quickstart study itself (``search_spaces/quickstart.yaml``, 4 to 8 minutes a run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from sr_tune.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUICK_STUDY = """name: overhead
base: {base}
fixed:
  training.eval_interval: 10
search:
  optimizer.lr: {{type: loguniform, low: 3.0e-4, high: 1.0e-2}}
objective: {{metric: val_psnr, mode: max}}
sampler: {{name: random, seed: 0}}
scheduler: {{name: none}}
budget: {{num_samples: 4, max_steps: 20, max_concurrent: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
"""


@dataclass(frozen=True)
class Run:
    code: str
    wall_s: float
    trained_s: float  # in the trials' own slots
    shared_s: float  # in slots the trials took over at the sweep's end
    concurrent: int
    first_eval_s: float
    before_s: float  # process start -> the parent run's start
    in_trials_s: float  # the trial runs' durations, summed
    after_s: float  # the last trial run's end -> process exit

    @property
    def overhead(self) -> float:
        return 1 - (self.trained_s + self.shared_s) / (self.wall_s * self.concurrent)

    def shares(self) -> dict[str, float]:
        """Each part of the slots' time (wall x concurrent trials) as a share of it."""
        slots = self.wall_s * self.concurrent
        between = slots - self.concurrent * (self.before_s + self.after_s) - self.in_trials_s - self.shared_s
        return {
            "before the sweep": self.concurrent * self.before_s / slots,
            "in trials, not training": (self.in_trials_s - self.trained_s) / slots,
            "between trials": between / slots,
            "after the last trial": self.concurrent * self.after_s / slots,
        }


def run_sweep(code: str, source: Path, study_text: str | None, study: Path, concurrent: int) -> Run:
    """One sweep in a fresh folder, with the package at ``source`` first on the path."""
    with tempfile.TemporaryDirectory(prefix="overhead-") as folder:
        work = Path(folder)
        if study_text is not None:
            study = work / "study.yaml"
            study.write_text(study_text)
        env = {**os.environ, "PYTHONPATH": str(source), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        started, started_at = time.perf_counter(), time.time()
        done = subprocess.run(
            [sys.executable, "-m", "sr_tune", "tune", str(study)], cwd=work, env=env, capture_output=True, text=True
        )
        wall, ended_at = time.perf_counter() - started, time.time()
        if done.returncode != 0:
            output = done.stdout[-3000:] + done.stderr[-3000:]
            raise SystemExit(f"{code}: sr-tune tune failed ({done.returncode}):\n{output}")
        sweep = next((work / "runs" / "sweeps").glob("*/trial_*")).parent
        trained = 0.0
        for trial in sweep.glob("trial_*"):
            latest = max(trial.glob("checkpoint_*"))  # Tune numbers them in order
            trained += load_checkpoint(latest).run.history[-1].seconds
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("sr_tune").experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        first = min(client.get_metric_history(r.info.run_id, "val_psnr")[0].timestamp for r in trials)
        shared = sum(_shared_slot_seconds(client, r.info.run_id) for r in trials)
        in_trials = sum(r.info.end_time - r.info.start_time for r in trials) / 1000
        last_end = max(r.info.end_time for r in trials) / 1000
    return Run(
        code,
        wall,
        trained,
        shared,
        concurrent,
        first_eval_s=(first - parent.info.start_time) / 1000,
        before_s=parent.info.start_time / 1000 - started_at,
        in_trials_s=in_trials,
        after_s=ended_at - last_end,
    )


def _shared_slot_seconds(client: MlflowClient, run_id: str) -> float:
    """The slot-seconds a trial trained on threads beyond its one CPU, from each ``cpu_threads`` point (the
    driver's grant) to the trial's last evaluation."""
    grants = sorted(client.get_metric_history(run_id, "cpu_threads"), key=lambda m: m.timestamp)
    last_eval = max((m.timestamp for m in client.get_metric_history(run_id, "val_psnr")), default=0)
    ends = [g.timestamp for g in grants[1:]] + [last_eval]
    return sum(max(0, end - g.timestamp) / 1000 * (g.value - 1) for g, end in zip(grants, ends))


def baseline_tree(revision: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 trials x 20 steps instead of the quickstart")
    parser.add_argument("--baseline", help="a git revision to compare with, e.g. the commit before a change")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version, alternating")
    args = parser.parse_args()

    study_text = QUICK_STUDY.format(base=ROOT / "configs" / "smoke.yaml") if args.quick else None
    study = ROOT / "search_spaces" / "quickstart.yaml"
    versions = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory(prefix="baseline-") as folder:
        if args.baseline:
            versions[f"baseline {args.baseline}"] = baseline_tree(args.baseline, Path(folder) / "tree")
        try:
            runs: list[Run] = []
            for repeat in range(args.repeats):
                for code, source in versions.items():
                    runs.append(run_sweep(code, source, study_text, study, concurrent=2))
                    r = runs[-1]
                    print(
                        f"[{repeat + 1}/{args.repeats}] {code}: wall {r.wall_s:.1f} s, trained {r.trained_s:.1f} s "
                        f"(+{r.shared_s:.1f} s in shared slots), "
                        f"overhead {r.overhead:.1%}, first eval after {r.first_eval_s:.1f} s",
                        flush=True,
                    )
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(folder) / "tree")])

    print(f"\n{'version':<28} {'wall s':>8} {'trained s':>10} {'overhead':>9} {'first eval s':>13}")
    medians = {}
    for code in versions:
        mine = [r for r in runs if r.code == code]
        wall = statistics.median(r.wall_s for r in mine)
        overhead = statistics.median(r.overhead for r in mine)
        medians[code] = wall
        trained = statistics.median(r.trained_s + r.shared_s for r in mine)
        first = statistics.median(r.first_eval_s for r in mine)
        print(f"{code:<28} {wall:>8.1f} {trained:>10.1f} {overhead:>9.1%} {first:>13.1f}")
    print("\nwhere the CPU slots' time went (medians):")
    print(f"{'version':<28} " + " ".join(f"{part:>24}" for part in runs[0].shares()) + f" {'training':>9}")
    for code in versions:
        mine = [r for r in runs if r.code == code]
        parts = {part: statistics.median(r.shares()[part] for r in mine) for part in runs[0].shares()}
        training = statistics.median(1 - r.overhead for r in mine)
        print(f"{code:<28} " + " ".join(f"{share:>24.1%}" for share in parts.values()) + f" {training:>9.1%}")
    if args.baseline:
        current, baseline = medians["this checkout"], medians[f"baseline {args.baseline}"]
        print(f"\nwall time, this checkout / baseline: {current / baseline:.2f}x")


if __name__ == "__main__":
    main()
