"""Delta-STN against an ASHA + TPE sweep over the same hyperparameters, and its cost per step.

The task: FSRCNN x2 (Y) on the built-in sample photographs with the hand-set photo recipe (L1, Adam lr 2e-3,
batch 32, LR patches of 16, cosine decay to 2%, EMA 0.999). Tuned: the L2 weight, the augmentation strength and
the weight of an MSE term added to the L1 loss. Learning rate and batch size are fixed for both methods (Delta-STN
cannot tune them).

1. Overhead: seconds per step of a plain step and of a Delta-STN step (phase (c) every ``interval`` steps
   included) on the same model and patches (warps on for both), in interleaved blocks; their ratio is what one
   Delta-STN step costs in plain steps.
2. Per seed:
   - ``sweep``: ASHA (grace one evaluation, reduction factor 2) + TPE through the product's sweep, over
     ``optimizer.weight_decay`` (Adam's L2 adds wd * w to the gradient: the loss's lambda ||w||^2 with
     wd = 2 lambda), ``data.augment_strength`` and ``loss.mix.mse``, drawing trials of ``--max-steps`` steps until
     ``--trials`` x ``--max-steps`` steps of compute are spent; its best checkpoint by validation PSNR.
   - ``delta_stn``: one run of ``--max-steps`` steps (one trial's length), tuning the same three from the
     middle of the sweep's ranges on validation patches.
   - ``delta_stn_long``: one run of the sweep's compute: budget / ratio steps.
   - ``delta_stn_frozen``: ``delta_stn`` with its values held at the start: what the tuning alone added.
   - ``fixed``, ``fixed_long``: controls, plain runs of those two lengths at the values Delta-STN starts from
     (what the tuning itself added, apart from training longer).
   Each model's PSNR-Y on the held-out photographs of ``photo_x2.py`` (whole images, 8-bit), its validation
   PSNR, and its compute in plain-step patches.

Printed: the overhead and a table (mean and range over seeds). ``--out DIR``: ``delta_stn.jsonl`` (every run's
evaluations and learned values) and ``delta_stn.png`` (the learned schedules and validation PSNR per seed).

    python benchmarks/delta_stn.py [--seeds 3] [--first-seed 0] [--trials 6] [--max-steps 2000] [--l2-start X]
        [--methods ...] [--ratio R] [--out DIR] [--quick]

``--l2-start``: where Delta-STN and the controls start L2 (default: the middle of the range, log scale); a
harmful start (1e-3) shows whether the tuning finds its way.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from hpo_efficiency import BudgetStopper, step_cost
from photo_x2 import RECIPE, held_out_folder, mean_scores, score

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import TrainConfig, load_config
from sr_tune.distributed import init_ray
from sr_tune.engine import train
from sr_tune.inference import Upscaler
from sr_tune.study import load_study
from sr_tune.sweep.driver import new_tuner
from sr_tune.sweep.layout import sweep_paths
from sr_tune.sweep.trial import TrialContext

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("sweep", "delta_stn", "delta_stn_long", "delta_stn_frozen", "fixed", "fixed_long")
# The recipe with a shorter warm-up (one override per key: a study's ``fixed`` is a mapping).
FIXED = [f"{k}={v}" for k, v in dict(i.split("=", 1) for i in [*RECIPE, "optimizer.warmup_steps=100"]).items()]
FIXED.append("training.device=cpu")
# The sweep's ranges; Delta-STN starts at their middle (log scale for the L2 and MSE weights).
L2 = (1e-9, 1e-2)  # lambda of lambda ||w||^2; the sweep's weight_decay is 2 lambda
STRENGTH = (0.0, 1.0)
MSE = (1e-3, 10.0)
L2_START = math.sqrt(L2[0] * L2[1])


def delta_stn_overrides(l2_start: float = L2_START) -> list[str]:
    return [
        "delta_stn.enabled=true",
        f"delta_stn.l2=[{l2_start:.3g}, {L2[0]}, {L2[1]}]",
        f"delta_stn.augment_strength=[0.5, {STRENGTH[0]}, {STRENGTH[1]}]",
        f"delta_stn.pixel_mix={{mse: [{math.sqrt(MSE[0] * MSE[1]):.3g}, {MSE[0]}, {MSE[1]}]}}",
    ]


STUDY = """name: {name}
base: {base}
fixed:
{fixed}
search:
  optimizer.weight_decay: {{type: loguniform, low: {wd_low}, high: {wd_high}}}
  data.augment_strength: {{type: uniform, low: {s_low}, high: {s_high}}}
  loss.mix.mse: {{type: loguniform, low: {m_low}, high: {m_high}}}
objective: {{metric: val_psnr, mode: max}}
sampler: {{name: tpe, seed: {seed}, startup_trials: 4}}
scheduler: {{name: asha, grace_period: {grace}, reduction_factor: 2}}
budget: {{num_samples: {samples}, max_steps: {max_steps}, max_concurrent: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
keep_checkpoints: 1
"""


def recipe(steps: int, seed: int, extra: list[str] = ()) -> TrainConfig:
    interval = max(steps // 8, 1)
    overrides = [*FIXED, f"training.steps={steps}", f"training.eval_interval={interval}", f"training.seed={seed}"]
    return load_config(ROOT / "configs" / "fsrcnn_x2.yaml", [*overrides, *extra])


def overhead(rounds: int, block: int) -> tuple[float, float]:
    """Median seconds per step of a plain step and of a Delta-STN step (its warm-up done), interleaved; warps
    and the MSE term on for both."""
    plain = recipe(10_000, 0, ["data.augment_strength=0.5", "loss.mix={mse: 0.1}"])
    return step_cost(plain, recipe(10_000, 0, delta_stn_overrides()), rounds, block)


def study_file(seed: int, args: argparse.Namespace, folder: Path) -> Path:
    fixed = "\n".join(f"  {key}: {value}" for key, value in (item.split("=", 1) for item in FIXED))
    path = folder / f"sweep_{seed}.yaml"
    path.write_text(
        STUDY.format(
            name=path.stem,
            base=ROOT / "configs" / "fsrcnn_x2.yaml",
            fixed=f"{fixed}\n  training.eval_interval: {args.max_steps // 8}\n  training.output_dir: {folder / 'runs'}",
            wd_low=2 * L2[0],
            wd_high=2 * L2[1],
            s_low=STRENGTH[0],
            s_high=STRENGTH[1],
            m_low=MSE[0],
            m_high=MSE[1],
            seed=seed,
            grace=args.max_steps // 8,
            samples=args.trials * 8,  # drawn until the budget is spent
            max_steps=args.max_steps,
        )
    )
    return path


def run_sweep(seed: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """ASHA + TPE until the budget is spent: its best checkpoint, validation PSNR and compute."""
    study = load_study(study_file(seed, args, folder))
    (folder / "sweeps").mkdir(exist_ok=True)
    paths = sweep_paths(study, None, storage=str(folder / "sweeps"))
    log = folder / f"sweep_{seed}.jsonl"
    budget = args.trials * study.patches(args.max_steps)
    stopper = BudgetStopper(budget, study.patches(study.eval_interval_steps()), log)
    context = TrialContext(study=study, paths=paths, tracking_uri=None, parent_run_id=None)
    grid = new_tuner(study, paths, context, callbacks=[], stop=stopper).fit()
    held = [
        (checkpoint.path, metrics, result.config)
        for result in grid
        for checkpoint, metrics in (result.best_checkpoints or [])
        if "val_psnr" in metrics
    ]
    path, metrics, config = max(held, key=lambda item: item[1]["val_psnr"])
    values = {key: config[key] for key in study.search}
    return {"checkpoint": path, "val_psnr": metrics["val_psnr"], "compute": stopper.spent, "best": values}


def run_delta_stn(
    seed: int, steps: int, ratio: float, folder: Path, l2_start: float, frozen: bool = False
) -> dict[str, Any]:
    """One Delta-STN run; ``frozen``: its values never leave the start (hyperparameter lr 1e-12), the control
    that differs from it in the tuning alone (same L2 form, warps, response weights and cost)."""
    config = recipe(steps, seed, [*delta_stn_overrides(l2_start), *(["delta_stn.hyper_lr=1e-12"] if frozen else [])])
    result = train(config, checkpoint_dir=folder)
    return {
        "checkpoint": str(folder / "best"),
        "val_psnr": result.best.psnr,
        "compute": round(steps * config.data.batch_size * ratio),
        "history": [{"step": r.step, "val_psnr": r.psnr, **r.hyper} for r in result.history],
    }


def run_fixed(seed: int, steps: int, folder: Path, l2_start: float) -> dict[str, Any]:
    """A plain run at the values Delta-STN starts from."""
    start = [
        f"optimizer.weight_decay={2 * l2_start:.3g}",
        "data.augment_strength=0.5",
        f"loss.mix={{mse: {math.sqrt(MSE[0] * MSE[1]):.3g}}}",
    ]
    config = recipe(steps, seed, start)
    result = train(config, checkpoint_dir=folder)
    return {"checkpoint": str(folder / "best"), "val_psnr": result.best.psnr, "compute": steps * config.data.batch_size}


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("l2", "augment_strength", "mix_mse", "val_psnr")
    figure, axes = plt.subplots(1, len(names), figsize=(16, 4))
    for row in rows:
        if "history" not in row:
            continue
        steps = [h["step"] for h in row["history"]]
        style = "-" if row["method"] == "delta_stn" else "--"
        for axis, name in zip(axes, names):
            axis.plot(steps, [h[name] for h in row["history"]], style, label=f"{row['method']} seed {row['seed']}")
    for axis, name in zip(axes, names):
        axis.set_title(name)
        axis.set_xlabel("step")
        if name in ("l2", "mix_mse"):
            axis.set_yscale("log")
    axes[-1].legend(fontsize=7)
    figure.suptitle("Delta-STN on FSRCNN x2: learned values (evaluations) and validation PSNR")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument(
        "--l2-start", type=float, default=L2_START, help="Delta-STN's and the controls' L2 start (default: mid-range)"
    )
    parser.add_argument("--trials", type=int, default=6, help="the sweep's budget in trials of --max-steps")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 trials of 48 steps, a short overhead")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"some of {', '.join(METHODS)}")
    parser.add_argument("--ratio", type=float, help="Delta-STN's cost in plain steps, as measured before (skips it)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.max_steps = 1, 2, 48
    rounds, block = (2, 5) if args.quick else (6, 40)

    methods = args.methods.split(",")
    if unknown := [method for method in methods if method not in METHODS]:
        parser.error(f"--methods: {', '.join(unknown)} (allowed: {', '.join(METHODS)})")
    plain_s = stn_s = math.nan
    if args.ratio is None:
        plain_s, stn_s = overhead(rounds, block)
        print(
            f"per step: plain {plain_s * 1e3:.1f} ms, Delta-STN {stn_s * 1e3:.1f} ms: {stn_s / plain_s:.2f} plain steps"
        )
    ratio = args.ratio or stn_s / plain_s
    long_steps = round(args.trials * args.max_steps / ratio)

    if "sweep" in methods:
        init_ray()
    log = args.out / "delta_stn.jsonl" if args.out else None
    if log:  # a row per run as it ends: a run stopped part-way keeps what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"plain_step_s": plain_s, "delta_stn_step_s": stn_s, "ratio": ratio}) + "\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="delta-stn-") as scratch:
        photos = held_out_folder(Path(scratch) / "held_out", 96 if args.quick else None)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            folder = Path(scratch) / f"seed{seed}"
            folder.mkdir()
            runs = {
                "sweep": lambda: run_sweep(seed, args, folder),
                "delta_stn": lambda: run_delta_stn(seed, args.max_steps, ratio, folder / "short", args.l2_start),
                "delta_stn_long": lambda: run_delta_stn(seed, long_steps, ratio, folder / "long", args.l2_start),
                "delta_stn_frozen": lambda: run_delta_stn(
                    seed, args.max_steps, ratio, folder / "frozen", args.l2_start, frozen=True
                ),
                "fixed": lambda: run_fixed(seed, args.max_steps, folder / "fixed", args.l2_start),
                "fixed_long": lambda: run_fixed(seed, long_steps, folder / "fixed_long", args.l2_start),
            }
            for method in methods:
                run = runs[method]()
                held_out = score(Upscaler.from_checkpoint(load_checkpoint(run.pop("checkpoint"))), photos)
                rows.append({"method": method, "seed": seed, "held_out_psnr": held_out, **run})
                if log:
                    with log.open("a") as out:
                        out.write(json.dumps(rows[-1]) + "\n")
                print(
                    f"seed {seed} {method}: held-out {held_out:.3f} dB, val {run['val_psnr']:.3f} dB, "
                    f"compute {run['compute']} patches"
                )
        bicubic = mean_scores(photos, "y", None)["bicubic_psnr"]

    print(f"\nheld-out bicubic {bicubic:.3f} dB; one Delta-STN step = {ratio:.2f} plain steps ({args.seeds} seeds)")
    print("| method | held-out PSNR-Y, mean (min-max) | gain over bicubic | val PSNR | compute (patches) |")
    print("| --- | --- | --- | --- | --- |")
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        held = [row["held_out_psnr"] for row in mine]
        print(
            f"| {method} | {statistics.fmean(held):.3f} ({min(held):.3f}-{max(held):.3f}) "
            f"| {statistics.fmean(held) - bicubic:+.2f} | {statistics.fmean(r['val_psnr'] for r in mine):.3f} "
            f"| {round(statistics.fmean(r['compute'] for r in mine))} |"
        )
    for row in rows:
        if "best" in row:
            print(f"sweep seed {row['seed']} best: " + ", ".join(f"{k} {v:.3g}" for k, v in row["best"].items()))
        if "history" in row:
            last = row["history"][-1]
            learned = ", ".join(f"{k} {last[k]:.3g}" for k in ("l2", "augment_strength", "mix_mse"))
            print(f"{row['method']} seed {row['seed']} ended at: {learned}")
    if args.out:
        plot(rows, args.out / "delta_stn.png")


if __name__ == "__main__":
    main()
