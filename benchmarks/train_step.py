"""Steps per second of ``engine.train``'s loop against a minimal PyTorch loop, side by side.

Both train the same model (same seed, so the same initial weights) with the same batch, optimizer (Adam, in
its fused kernels as the engine builds it) and threads. The bare loop is what a hand-written script does at
best: ``model(lr)``, MSE, ``zero_grad``, ``backward``, ``step``, on batches drawn before the clock starts. The
engine runs as a training run does (its patch sampler with the default augmentation, the lr schedule, its
loss window), with ``eval_interval`` set so that its second evaluation window holds exactly the timed steps:
the engine's own patches/s of that window (validation and start-up excluded) is compared. Each of
``--repeats`` rounds runs engine, bare, bare, engine (on this machine the second of two runs in a row is
measurably faster, so plain alternation with an odd number of rounds favours one side); the medians of all
runs are compared, and the sampler alone is timed over the same steps for its share of an engine step.

    python benchmarks/train_step.py [--quick] [--models espcn,fsrcnn,...] [--steps 60] [--repeats 3] [--device cpu]

``--quick``: 10 timed steps, one repeat (under 5 minutes on 2 CPUs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sr_tune.config import TrainConfig, load_config
from sr_tune.engine import build_data, train
from sr_tune.models import create_model

MODELS = ("srcnn_915", "fsrcnn", "espcn", "vdsr", "edsr_baseline", "srresnet")


def model_config(name: str, steps: int, warmup: int, device: str) -> TrainConfig:
    """x3, batch 16, Y, the default augmentation (flips and rotations), validation kept small."""
    return load_config(
        None,
        [
            f"model.name={name}",
            "model.scale=3",
            "data.color=y",
            "data.batch_size=16",
            "data.val_crop=48",
            f"training.steps={warmup + steps}",
            f"training.eval_interval={warmup}",
            f"training.device={device}",
        ],
    )


def engine_steps_per_second(config: TrainConfig, device: torch.device) -> float:
    """The engine's own measure of its second evaluation window: the timed steps, nothing else."""
    results = []
    train(config, on_eval=lambda result, checkpoint: results.append(result), device=device)
    return results[-1].patches_per_second / config.data.batch_size


def bare_steps_per_second(config: TrainConfig, device: torch.device, warmup: int, steps: int) -> float:
    sampler, _ = build_data(config, device, 0, 1)
    batches = [sampler.batch(step) for step in range(1, warmup + steps + 1)]  # drawn before the clock starts
    torch.manual_seed(config.training.seed)
    model = create_model(config.model.name, scale=config.model.scale, in_channels=config.in_channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optimizer.lr, fused=True)  # as the engine's
    loss_fn = nn.MSELoss()

    def step(lr: torch.Tensor, hr: torch.Tensor) -> None:
        loss = loss_fn(model(lr), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for lr, hr in batches[:warmup]:
        step(lr, hr)
    _sync(device)
    started = time.perf_counter()
    for lr, hr in batches[warmup:]:
        step(lr, hr)
    _sync(device)
    return steps / (time.perf_counter() - started)


def sampler_seconds_per_batch(config: TrainConfig, device: torch.device, steps: int) -> float:
    sampler, _ = build_data(config, device, 0, 1)
    sampler.batch(1)
    _sync(device)
    started = time.perf_counter()
    for step in range(2, steps + 2):
        sampler.batch(step)
    _sync(device)
    return (time.perf_counter() - started) / steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    device = torch.device(args.device)
    models = args.models.split(",")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, x3 Y batch 16")

    engine: dict[str, list[float]] = {name: [] for name in models}
    bare: dict[str, list[float]] = {name: [] for name in models}
    sampler: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats):
        for name in models:
            config = model_config(name, steps, args.warmup, args.device)
            runs = [
                lambda: engine[name].append(engine_steps_per_second(config, device)),
                lambda: bare[name].append(bare_steps_per_second(config, device, args.warmup, steps)),
            ]
            for run in (*runs, *reversed(runs)):  # engine, bare, bare, engine: the second run of a pair is faster
                run()
            sampler[name].append(sampler_seconds_per_batch(config, device, steps))
            print(
                f"[{repeat + 1}/{repeats}] {name}: engine {engine[name][-2]:.2f} {engine[name][-1]:.2f} steps/s, bare "
                f"{bare[name][-2]:.2f} {bare[name][-1]:.2f} steps/s, sampler {sampler[name][-1] * 1000:.2f} ms/batch",
                flush=True,
            )

    print(f"\n{'model':<15} {'engine steps/s':>15} {'bare steps/s':>13} {'sampler ms':>11} {'share':>6} {'ratio':>6}")
    for name in models:
        mine, theirs = statistics.median(engine[name]), statistics.median(bare[name])
        drawing = statistics.median(sampler[name])
        share = drawing * mine  # of one engine step's time
        print(f"{name:<15} {mine:>15.2f} {theirs:>13.2f} {drawing * 1000:>11.2f} {share:>6.1%} {mine / theirs:>6.2f}")


if __name__ == "__main__":
    main()
