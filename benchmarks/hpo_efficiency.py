"""Search efficiency: the compute each search method needs to find a good model, at equal total budget.

One fixed task, FSRCNN x2 (Y) on the built-in sample photographs with Adam, batch 16, searching the learning
rate, L2 and the gradient-clipping norm (all three changeable inside a running trial, so PBT searches the same
space); or, with ``--study FILE``, that study's search space and fixed recipe (its budget, scheduler and sampler
replaced by the benchmark's; PBT only where the study's keys can change inside a trial). Every method runs
through the product's own sweep (``sweep.new_tuner``: Optuna samplers inside Ray Tune, ASHA and PBT as a study
configures them, trials training in their Tune process), one local Ray for all:

- random, tpe, qmc: ``--trials`` trials of ``--max-steps`` steps each, the whole budget;
- asha+random, asha+tpe: ASHA with the studies' defaults (grace period one evaluation interval, reduction
  factor 2, or ``--grace`` / ``--reduction-factor``), drawing trials until they have used the same budget;
- pbt: a population of ``--trials`` trials of ``--max-steps`` steps, exploiting every evaluation interval;
- recipe: no search, the hand-set recipe: one run of the whole budget at the base config's values (its paper
  defaults) with the task's fixed settings;
- asha+tpe+delta_stn: asha+tpe over what Delta-STN cannot tune (lr, clip norm; with ``--study``, all but L2,
  augmentation strength and ``loss.mix`` weights), each trial tuning the rest online from the middle of its
  range. A Delta-STN step is counted as the plain steps it costs (measured first on the task's model, interleaved
  blocks; or ``--delta-stn-cost``), its warm-up steps (one evaluation interval) at that cost too.

Compute is counted in patches trained (one evaluation interval's patches per reported evaluation), not in
seconds, so a busy machine changes nothing but the wall time. Each method runs with seeds 0..``--seeds``-1.

Printed last: for each method, the compute it needed to reach random search's final best (the median over
random's seeds), its share of the budget and of random's own compute to get there; the rank correlation
(Spearman) between a trial's PSNR at each ASHA rung and its final best, over the trials that ran to the end.
``--out DIR`` gets the plot (best-so-far validation PSNR vs compute, mean and min-max over seeds) and the
raw reports as JSON lines.

    python benchmarks/hpo_efficiency.py [--quick] [--methods ...] [--seeds 3] [--trials 12] [--max-steps 400]
        [--study FILE] [--delta-stn-cost R] [--reports FILE] [--out DIR]

``--reports FILE``: an earlier run's reports (its ``--out``): the methods it holds are read, the others run.

``--quick``: one seed, 4 trials of 96 steps (about 4 minutes on 2 CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from sr_tune.config import TrainConfig
from sr_tune.distributed import init_ray
from sr_tune.study import Distribution, Study, load_study
from sr_tune.sweep.driver import new_tuner
from sr_tune.sweep.layout import sweep_paths
from sr_tune.sweep.trial import TrialContext

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # name: (sampler, scheduler)
    "random": ("random", "none"),
    "tpe": ("tpe", "none"),
    "qmc": ("qmc", "none"),
    "asha+random": ("random", "asha"),
    "asha+tpe": ("tpe", "asha"),
    "pbt": ("random", "pbt"),
    "asha+tpe+delta_stn": ("tpe", "asha"),  # and Delta-STN inside each trial for what it can tune
    "recipe": ("random", "none"),  # no search: one run of the whole budget at the base config's values
}
STUDY = """name: {name}
base: {base}
fixed:
  optimizer.name: adam
  optimizer.last_layer_lr_scale: 1.0
  data.batch_size: 16
  data.val_crop: 96
  training.eval_interval: {interval}
  training.output_dir: {output}
search:
  optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-1}}
  optimizer.weight_decay: {{type: loguniform, low: 1.0e-8, high: 1.0e-2}}
  optimizer.grad_clip_norm: {{type: loguniform, low: 1.0e-2, high: 10.0}}
objective: {{metric: val_psnr, mode: max}}
sampler: {{name: {sampler}, seed: {seed}}}
scheduler: {scheduler}
budget: {{num_samples: {samples}, max_steps: {max_steps}, max_concurrent: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
keep_checkpoints: 1
"""


@dataclass(frozen=True)
class Report:
    trial: str
    step: int
    psnr: float  # -inf for a diverged trial's NaN
    compute: int  # patches trained by the whole sweep when this evaluation arrived


class BudgetStopper(tune.Stopper):
    """Counts the sweep's compute as reports arrive (each one evaluation interval of patches), writes each
    report to ``log`` and stops the whole sweep once ``budget`` patches are trained."""

    def __init__(self, budget: int, interval_patches: int, log: Path) -> None:
        self.budget, self.interval_patches, self.log, self.spent = budget, interval_patches, log, 0
        self.counted: set[tuple[str, int]] = set()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        # Tune hands a finished trial's last result over once more (done=True): count each evaluation once.
        if "val_psnr" not in result or (trial_id, int(result["step"])) in self.counted:
            return False
        self.counted.add((trial_id, int(result["step"])))
        self.spent += self.interval_patches
        psnr = float(result["val_psnr"])
        report = {"trial": trial_id, "step": int(result["step"]), "psnr": psnr if math.isfinite(psnr) else -math.inf}
        with self.log.open("a") as out:
            out.write(json.dumps({**report, "compute": self.spent}) + "\n")
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def step_cost(plain: TrainConfig, stn: TrainConfig, rounds: int, block: int) -> tuple[float, float]:
    """Median seconds per step of a plain training step on ``plain`` and of a Delta-STN step (phase (c) every
    ``delta_stn.interval`` steps included, its warm-up skipped) on ``stn``: same model, interleaved blocks."""
    import torch

    from sr_tune.engine import build_data
    from sr_tune.losses import SRLoss
    from sr_tune.models import create_model
    from sr_tune.online_tuning import OnlineTuner
    from sr_tune.optim import build_optimizer, parameter_groups

    device, opt = torch.device("cpu"), plain.optimizer

    def parts(config: TrainConfig) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
        sampler, _ = build_data(config, device, 0, 1)
        model = create_model(
            config.model.name, scale=config.model.scale, in_channels=config.in_channels, **config.model.kwargs
        ).train()
        return sampler, model, build_optimizer(opt, parameter_groups(model, opt.lr, opt.last_layer_lr_scale))

    sampler, model, optimizer = parts(plain)
    loss_fn = SRLoss(plain.loss)

    def plain_step(step: int) -> None:
        lr, hr = sampler.batch(step)
        loss = sum(loss_fn(model(lr), hr).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    stn = dataclasses.replace(stn, delta_stn=dataclasses.replace(stn.delta_stn, warmup_steps=0))
    stn_sampler, stn_model, stn_optimizer = parts(stn)
    tuner = OnlineTuner.build(stn, stn_model, stn_optimizer, stn_sampler, rank=0, world_size=1)
    times: dict[str, list[float]] = {"plain": [], "delta_stn": []}
    step = 1
    for _ in range(rounds):
        for name, run in (("plain", plain_step), ("delta_stn", tuner.step)):
            started = time.perf_counter()
            for offset in range(block):
                run(step + offset)
            times[name].append((time.perf_counter() - started) / block)
        step += block
    return statistics.median(times["plain"]), statistics.median(times["delta_stn"])


def method_study(method: str, seed: int, args: argparse.Namespace, folder: Path) -> Study:
    """The task's study set up for ``method``: the built-in FSRCNN one, or ``--study``'s search space and fixed
    recipe with the method's sampler and scheduler and the benchmark's budget."""
    sampler, scheduler = METHODS[method]
    interval = args.max_steps // 8
    samples = args.trials * 8 if scheduler == "asha" else args.trials  # ASHA draws until the budget is spent
    name = f"{method.replace('+', '_')}_{seed}"
    if args.study:
        return load_study(
            args.study,
            [
                f"name={name}",
                f"sampler.name={sampler}",
                f"sampler.seed={seed}",
                f"scheduler.name={scheduler}",
                f"scheduler.grace_period={args.grace * interval}",
                f"scheduler.reduction_factor={args.reduction_factor}",
                f"budget.num_samples={samples}",
                f"budget.max_steps={args.max_steps}",
                "budget.max_concurrent=2",
                "budget.time_limit_s=0",
                "budget.final_steps=0",
                f"training.eval_interval={interval}",
                f"training.output_dir={folder / 'runs'}",
                "keep_checkpoints=1",
            ],
        )
    schedulers = {
        "none": "{name: none}",
        "asha": f"{{name: asha, grace_period: {args.grace * interval}, reduction_factor: {args.reduction_factor}}}",
        "pbt": "{name: pbt}",
    }
    path = folder / f"{name}.yaml"
    path.write_text(
        STUDY.format(
            name=path.stem,
            base=ROOT / "configs" / "fsrcnn_x2.yaml",
            interval=interval,
            output=folder / "runs",
            sampler=sampler,
            seed=seed,
            scheduler=schedulers[scheduler],
            samples=samples,
            max_steps=args.max_steps,
        )
    )
    return load_study(path)


def delta_stn_study(study: Study) -> Study:
    """``study`` with what Delta-STN tunes taken out of the search and tuned inside each trial from the middle of
    its range: L2 (``optimizer.weight_decay`` w adds w * weights to the gradient, so lambda = w / 2), the
    augmentation strength and ``loss.mix`` weights. Its warm-up is one evaluation interval."""
    search, fixed = dict(study.search), {**study.fixed, "delta_stn.enabled": True}
    fixed["delta_stn.warmup_steps"] = study.eval_interval_steps()
    if (wd := search.get("optimizer.weight_decay")) and wd.type == "loguniform":
        del search["optimizer.weight_decay"]
        low, high = wd.low / 2, wd.high / 2
        fixed.update({"optimizer.weight_decay": 0.0, "delta_stn.l2": [math.sqrt(low * high), low, high]})
    if (strength := search.get("data.augment_strength")) and strength.type == "uniform":
        del search["data.augment_strength"]
        middle = (strength.low + strength.high) / 2
        fixed.update(
            {"data.augment_strength": 0.0, "delta_stn.augment_strength": [middle, strength.low, strength.high]}
        )
    mix = {
        key.removeprefix("loss.mix."): search.pop(key)
        for key, weight in list(search.items())
        if key.startswith("loss.mix.") and weight.type == "loguniform"
    }
    if mix:
        fixed["delta_stn.pixel_mix"] = {name: [math.sqrt(d.low * d.high), d.low, d.high] for name, d in mix.items()}
    return dataclasses.replace(study, search=search, fixed=fixed)


def recipe_study(study: Study, seed: int, budget_steps: int) -> Study:
    """The hand-set recipe: the base config with the study's fixed values (the searched keys at the base
    config's, its paper defaults), trained once for the whole budget; only the seed is "searched"."""
    return dataclasses.replace(
        study,
        search={"training.seed": Distribution(type="choice", values=(seed,))},
        budget=dataclasses.replace(study.budget, num_samples=1, max_steps=budget_steps),
    )


def run_method(method: str, seed: int, args: argparse.Namespace, folder: Path) -> list[Report]:
    study = method_study(method, seed, args, folder)
    cost = 1.0  # plain steps per step
    if method.endswith("+delta_stn"):
        study, cost = delta_stn_study(study), args.delta_stn_cost
    if method == "recipe":
        study = recipe_study(study, seed, args.trials * args.max_steps)
    (folder / "sweeps").mkdir(exist_ok=True)  # the Optuna studies' SQLite file lies there
    paths = sweep_paths(study, None, storage=str(folder / "sweeps"))
    log = folder / f"{study.name}.jsonl"
    stopper = BudgetStopper(
        budget=args.trials * study.patches(args.max_steps),
        interval_patches=round(study.patches(study.eval_interval_steps()) * cost),
        log=log,
    )
    context = TrialContext(study=study, paths=paths, tracking_uri=None, parent_run_id=None)
    new_tuner(study, paths, context, callbacks=[], stop=stopper).fit()
    return [Report(**json.loads(line)) for line in log.read_text().splitlines()]


def best_so_far(reports: list[Report], grid: list[int]) -> list[float]:
    """The best PSNR reported by each compute of ``grid`` (-inf before the first report)."""
    best, curve, arrived = -math.inf, [], iter(reports)
    upcoming = next(arrived, None)
    for compute in grid:
        while upcoming is not None and upcoming.compute <= compute:
            best, upcoming = max(best, upcoming.psnr), next(arrived, None)
        curve.append(best)
    return curve


def mean_curve(seeds: list[list[Report]], grid: list[int]) -> list[float]:
    """Best-so-far averaged over seeds at each compute of ``grid``."""
    return [statistics.fmean(column) for column in zip(*(best_so_far(reports, grid) for reports in seeds))]


def compute_to_reach(curve: list[float], grid: list[int], target: float) -> float:
    return next((compute for compute, best in zip(grid, curve) if best >= target), math.inf)


def rung_correlations(runs: dict[str, list[list[Report]]], args: argparse.Namespace) -> list[tuple[int, float, int]]:
    """(rung step, Spearman rho, trials) of a trial's best PSNR up to each ASHA rung vs its final best, over
    the trials of the methods without a scheduler that ran to the end (all 8 evaluations; the budget cuts the
    last ones short). Rungs count evaluations, as ASHA does: a trial's own steps depend on its batch size."""
    from scipy.stats import spearmanr

    interval = args.max_steps // 8
    trials: list[list[Report]] = []
    for method in ("random", "tpe", "qmc"):
        for reports in runs.get(method, []):
            by_trial: dict[str, list[Report]] = {}
            for report in reports:
                by_trial.setdefault(report.trial, []).append(report)
            trials.extend(trial for trial in by_trial.values() if len(trial) == 8)
    finals = [max(r.psnr for r in trial) for trial in trials]
    rows = []
    rung = args.grace * interval
    while rung < args.max_steps:
        early = [max(r.psnr for r in trial[: rung // interval]) for trial in trials]
        rows.append((rung, float(spearmanr(early, finals).statistic), len(trials)))
        rung = int(rung * args.reduction_factor)
    return rows


def plot(runs: dict[str, list[list[Report]]], grid: list[int], target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    thousands = [x / 1000 for x in grid]
    for method, seeds in runs.items():
        curves = [best_so_far(reports, grid) for reports in seeds]
        (line,) = axes.plot(thousands, mean_curve(seeds, grid), label=method, drawstyle="steps-post")
        low, high = [min(column) for column in zip(*curves)], [max(column) for column in zip(*curves)]
        axes.fill_between(thousands, low, high, color=line.get_color(), alpha=0.12, step="post")
    axes.axhline(target, color="black", linestyle=":", linewidth=1, label="random search's final best (mean)")
    finite = [r.psnr for seeds in runs.values() for reports in seeds for r in reports if math.isfinite(r.psnr)]
    axes.set_ylim(bottom=statistics.median(finite) - 2, top=max(finite) + 0.5)
    axes.set_xlabel("compute (thousand patches trained, all trials together)")
    axes.set_ylabel("best validation PSNR so far (dB)")
    axes.set_title("FSRCNN x2 search at equal budget: mean over seeds, band = min-max")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def run_methods(methods: list[str], args: argparse.Namespace) -> dict[str, list[list[Report]]]:
    init_ray()
    runs: dict[str, list[list[Report]]] = {}
    with tempfile.TemporaryDirectory(prefix="hpo-") as scratch:
        for seed in range(args.seeds):
            for method in methods:  # seed by seed, so that an early stop still compares every method
                runs.setdefault(method, []).append(run_method(method, seed, args, Path(scratch)))
                best = max(r.psnr for r in runs[method][-1])
                print(f"{method} seed {seed}: best {best:.3f} dB after {runs[method][-1][-1].compute} patches")
    return runs


def read_reports(path: Path, methods: list[str]) -> dict[str, list[list[Report]]]:
    """The reports of an earlier run, each evaluation once: logs written before ``BudgetStopper`` skipped
    Tune's repeated last result hold those twice, each counted as one more interval of compute, so the
    compute is recounted (one interval per evaluation, in order of arrival)."""
    runs: dict[str, dict[int, list[Report]]] = {}
    for line in path.read_text().splitlines():
        report = json.loads(line)
        method, seed = report.pop("method"), report.pop("seed")
        if method in methods:
            runs.setdefault(method, {}).setdefault(seed, []).append(Report(**report))
    recounted: dict[str, list[list[Report]]] = {}
    for method, seeds in runs.items():
        for seed in sorted(seeds):
            unique: dict[tuple[str, int], Report] = {}
            for report in seeds[seed]:
                unique.setdefault((report.trial, report.step), report)  # the first arrival of each
            interval = seeds[seed][0].compute
            recounted.setdefault(method, []).append(
                [dataclasses.replace(r, compute=(i + 1) * interval) for i, r in enumerate(unique.values())]
            )
    return recounted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 4 trials of 96 steps")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12, help="trials of the methods without early stopping")
    parser.add_argument("--max-steps", type=int, default=400, help="a trial's steps (8 evaluations)")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period in evaluation intervals")
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument(
        "--delta-stn-cost", type=float, help="one Delta-STN step in plain steps, as measured before (skips measuring)"
    )
    parser.add_argument("--out", type=Path, help="folder for the plot and the raw reports")
    parser.add_argument(
        "--reports", type=Path, help="the reports an earlier run wrote (--out): its methods are read, not run again"
    )
    parser.add_argument(
        "--study", type=Path, help="a study file whose search space and recipe to use (default: the FSRCNN task)"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.max_steps = 1, 4, 96
    if args.max_steps % 8:
        parser.error("--max-steps: a multiple of 8 (8 evaluations of equal length)")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "random" not in methods:
        parser.error(f"--methods: {unknown or 'random is the reference and must be one of them'}")

    runs = read_reports(args.reports, methods) if args.reports else {}
    to_run = [m for m in methods if m not in runs]  # with --reports: the methods its file lacks
    if any(m.endswith("+delta_stn") for m in to_run) and args.delta_stn_cost is None:
        plain = method_study("asha+tpe", 0, args, Path(tempfile.mkdtemp(prefix="hpo-study-")))
        plain_s, stn_s = step_cost(
            plain.base_config, delta_stn_study(plain).base_config, *((2, 5) if args.quick else (6, 40))
        )
        args.delta_stn_cost = stn_s / plain_s
        print(
            f"per step: plain {plain_s * 1e3:.1f} ms, Delta-STN {stn_s * 1e3:.1f} ms ({args.delta_stn_cost:.2f} plain)"
        )
    if to_run:
        runs.update(run_methods(to_run, args))
    batch = method_study("random", 0, args, Path(tempfile.mkdtemp(prefix="hpo-study-"))).base_batch_size
    budget = args.trials * args.max_steps * batch
    grid = list(range(budget // (8 * args.trials), budget + 1, budget // (8 * args.trials)))  # one report apart
    target = statistics.fmean(max(r.psnr for r in reports) for reports in runs["random"])
    random_reach = compute_to_reach(mean_curve(runs["random"], grid), grid, target)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(runs, grid, target, args.out / "hpo_efficiency.png")
        with (args.out / "hpo_efficiency.jsonl").open("w") as out:
            for method, seeds in runs.items():
                for seed, reports in enumerate(seeds):
                    for r in reports:
                        out.write(json.dumps({"method": method, "seed": seed, **vars(r)}) + "\n")

    print(f"\nbudget {budget} patches a run ({args.trials} trials x {args.max_steps} steps x {batch} patches); random")
    print(f"search's final best, mean of {args.seeds} seeds: {target:.3f} dB; its mean curve gets there after")
    print(f"{random_reach} patches. 'compute to reach': where a method's mean best-so-far curve first gets there.")
    columns = ("final best dB, mean (min-max)", "seeds reaching it", "compute to reach", "of budget", "of random's")
    print("| method | " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, seeds in runs.items():
        finals = [max(r.psnr for r in reports) for reports in seeds]
        reach = compute_to_reach(mean_curve(seeds, grid), grid, target)
        shares = (f"{reach / budget:.2f}", f"{reach / random_reach:.2f}") if math.isfinite(reach) else ("-", "-")
        print(
            f"| {method} | {statistics.fmean(finals):.3f} ({min(finals):.3f}-{max(finals):.3f}) "
            f"| {sum(final >= target for final in finals)}/{len(finals)} | {reach} | {shares[0]} | {shares[1]} |"
        )
    print("\n| ASHA rung (step) | Spearman rho, PSNR by the rung vs final best | trials |")
    print("| --- | --- | --- |")
    for rung, rho, count in rung_correlations(runs, args):
        print(f"| {rung} | {rho:.2f} | {count} |")


if __name__ == "__main__":
    main()
