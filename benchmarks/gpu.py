"""The GPU path, checked and timed in one run: CUDA correctness, throughput by precision, the classic
DataLoader pipeline side by side, and host syncs per training step.

Imports only the Ray-free core (engine, data, models, metrics, losses), so it runs on a bare machine whose
python3 has torch but not ray, mlflow or optuna:

    PYTHONPATH=. python3 benchmarks/gpu.py --out DIR            # on a CUDA machine
    PYTHONPATH=. python3 benchmarks/gpu.py --device cpu --quick  # the same code paths, tiny, on a CPU

Every result goes to DIR/gpu.json (rewritten after each measurement, so a run cut short keeps what it had)
and a line per result to the console; the ratios come last.

1. Correctness: MATLAB imresize, PSNR/SSIM and the patch sampler on CUDA against the CPU; FSRCNN trained
   on CUDA in fp32 (TF32 off) against the same run on the CPU; bf16 against fp32 after the same steps.
2. Throughput of our loop (device-resident sampler -> model -> loss -> Adam, as ``engine.train`` runs it)
   for SRResNet x4 and EDSR-baseline x2 (RGB), LR patches 48/96, batch 16/64: fp32, bf16, bf16 +
   channels-last, bf16 + channels-last + torch.compile. Model FLOPs per step (``torch.utils.flop_counter``),
   achieved TFLOP/s against the card's bf16 matmul peak measured here, the sampler's share of a step, and
   peak memory.
3. The classic pipeline (``benchmarks/sampler.py``'s: DataLoader, here 8 workers, PIL decode, random crop and
   flips per sample, MATLAB-style bicubic on the CPU) feeding the same model, batch and precision.
4. Host syncs per training step of ``engine.train`` (``torch.cuda.set_sync_debug_mode('warn')``), from the
   difference of two runs of different lengths, so set-up and evaluation cancel.
5. A profile of the best settings (GPU busy time against wall time, the top kernels), and
   ``training.compile`` on and off through ``engine.train``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.sampler import ClassicPatches
from sr_tune.config import LossConfig, load_config
from sr_tune.data.augment import Augmenter
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler
from sr_tune.data.sources import sample_images, skimage_photo
from sr_tune.engine import train
from sr_tune.losses import SRLoss
from sr_tune.metrics import psnr, ssim
from sr_tune.models import create_model

RESULTS: dict[str, Any] = {}


class Recorder:
    def __init__(self, out: Path | None) -> None:
        self.out = out
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, value: Any, line: str) -> None:
        RESULTS[key] = value
        print(line, flush=True)
        if self.out is not None:
            (self.out / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. correctness ----------------------------------------------------------------------------------------


def correctness(device: torch.device, quick: bool, record: Recorder) -> None:
    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float64, torch.float32):
        x = torch.rand(2, 3, 67, 53, generator=gen, dtype=torch.float64).to(dtype)
        diffs = []
        for antialias in (True, False):
            for size in ((22, 18), (201, 159)):
                cpu = imresize(x, size=size, antialias=antialias)
                dev = imresize(x.to(device), size=size, antialias=antialias).cpu()
                diffs.append(float((cpu - dev).abs().max()))
        worst[str(dtype).removeprefix("torch.")] = max(diffs)
    record("imresize_max_abs_diff", worst, f"imresize CUDA vs CPU, max |diff|: {worst}")

    hr = skimage_photo("astronaut").double()[None] / 255  # (1, 3, 512, 512)
    sr = (hr + 0.03 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    metric_diffs = {
        "psnr_y": abs(
            psnr(sr, hr, crop_border=4, y_channel=True).item()
            - psnr(sr.to(device), hr.to(device), crop_border=4, y_channel=True).item()
        ),
        "ssim_y": abs(
            ssim(sr, hr, crop_border=4, y_channel=True).item()
            - ssim(sr.to(device), hr.to(device), crop_border=4, y_channel=True).item()
        ),
    }
    record("metrics_abs_diff", metric_diffs, f"PSNR/SSIM CUDA vs CPU, |diff|: {metric_diffs}")

    images = [image.hr for image in sample_images("train")]
    sampler_diffs = {}
    for strength in (0.0, 0.5):
        samplers = [
            PatchSampler(
                ImageBank(images, where),
                scale=3,
                lr_patch_size=16,
                batch_size=16,
                color="y",
                augmenter=Augmenter(strength=strength),
                seed=7,
            )
            for where in (torch.device("cpu"), device)
        ]
        lr_diff = hr_diff = 0.0
        for step in range(1, 6):
            (lr_cpu, hr_cpu), (lr_dev, hr_dev) = (s.batch(step) for s in samplers)
            lr_diff = max(lr_diff, float((lr_cpu - lr_dev.cpu()).abs().max()))
            hr_diff = max(hr_diff, float((hr_cpu - hr_dev.cpu()).abs().max()))
        sampler_diffs[f"strength_{strength}"] = {"lr": lr_diff, "hr": hr_diff}
    record("sampler_max_abs_diff", sampler_diffs, f"sampler CUDA vs CPU (same seed), max |diff|: {sampler_diffs}")

    steps = 20 if quick else 300
    overrides = [
        "model.name=fsrcnn",
        "model.scale=2",
        f"training.steps={steps}",
        f"training.eval_interval={steps // 4}",
        "data.val_crop=96",
        "data.batch_size=16",
        "data.lr_patch_size=24",
    ]

    def run(where: torch.device, bf16: bool) -> list[Any]:
        config = load_config(
            None, [*overrides, f"training.bf16={str(bf16).lower()}", f"training.channels_last={str(bf16).lower()}"]
        )
        return train(config, device=where).history

    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32: cuDNN would use TF32 convolutions by default
    cpu_curve, fp32_curve = run(torch.device("cpu"), False), run(device, False)
    torch.backends.cudnn.allow_tf32 = True
    bf16_curve = run(device, True)
    loss_rel = max(abs(a.loss - b.loss) / abs(a.loss) for a, b in zip(cpu_curve, fp32_curve))
    psnr_diff = max(abs(a.psnr - b.psnr) for a, b in zip(cpu_curve, fp32_curve))
    record(
        "fsrcnn_cuda_fp32_vs_cpu",
        {
            "steps": steps,
            "max_loss_rel_diff": loss_rel,
            "max_psnr_diff_db": psnr_diff,
            "cpu": [(r.step, r.loss, r.psnr) for r in cpu_curve],
            "cuda": [(r.step, r.loss, r.psnr) for r in fp32_curve],
        },
        f"FSRCNN x2 {steps} steps, CUDA fp32 vs CPU: loss within {loss_rel:.2e} (relative), "
        f"PSNR within {psnr_diff:.4f} dB",
    )
    finite = all(math.isfinite(r.loss) and math.isfinite(r.psnr) for r in bf16_curve)
    gap = bf16_curve[-1].psnr - fp32_curve[-1].psnr
    record(
        "fsrcnn_bf16_vs_fp32",
        {"finite": finite, "psnr_fp32": fp32_curve[-1].psnr, "psnr_bf16": bf16_curve[-1].psnr, "gap_db": gap},
        f"FSRCNN x2 bf16+channels-last: finite {finite}, PSNR {bf16_curve[-1].psnr:.3f} vs fp32 "
        f"{fp32_curve[-1].psnr:.3f} dB (gap {gap:+.3f} dB)",
    )


# --- 2. throughput -----------------------------------------------------------------------------------------

MODES = {  # name: (bf16, channels_last, compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16_cl": (True, True, False),
    "bf16_cl_compile": (True, True, True),
}


def matmul_peak(device: torch.device, quick: bool) -> float:
    n = 1024 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 2 if quick else 20
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


class Loop:
    """Our training step as ``engine.train`` runs it (sampler -> model -> pixel loss -> Adam), for one model,
    patch size, batch and precision mode."""

    def __init__(self, name: str, scale: int, lr_patch: int, batch: int, mode: str, bank: ImageBank) -> None:
        bf16, channels_last, compiled = MODES[mode]
        self.device, self.channels_last = bank.device, channels_last
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model = create_model(name, scale=scale, in_channels=3).to(self.device, memory_format=memory_format)
        self.net = torch.compile(self.model) if compiled else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.loss = SRLoss(LossConfig())
        self.sampler = PatchSampler(
            bank, scale=scale, lr_patch_size=lr_patch, batch_size=batch, color="rgb", augmenter=Augmenter(), seed=0
        )
        on_cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and on_cuda else nullcontext()
        self.batch = batch

    def step(self, lr: torch.Tensor, hr: torch.Tensor, eager: bool = False) -> None:
        if self.channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            sr = (self.model if eager else self.net)(lr).float()
        loss = sum(self.loss(sr, hr).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def flops(self) -> int:
        lr, hr = self.sampler.batch(0)
        with FlopCounterMode(display=False) as counter:  # the eager model: the compiled one hides its ops
            self.step(lr, hr, eager=True)
        return counter.get_total_flops()


def timed(device: torch.device, run: Callable[[int], None], warmup: int, min_seconds: float, min_steps: int) -> float:
    """Seconds per call of ``run(step)`` after ``warmup`` calls, over at least ``min_steps`` and ``min_seconds``."""
    for step in range(warmup):
        run(step)
    synchronize(device)
    start, count = time.perf_counter(), 0
    while count < min_steps or time.perf_counter() - start < min_seconds:
        run(warmup + count)
        count += 1
        if count % 10 == 0 or device.type != "cuda":
            synchronize(device)
    synchronize(device)
    return (time.perf_counter() - start) / count


def throughput(device: torch.device, quick: bool, record: Recorder) -> dict[str, float]:
    peak = matmul_peak(device, quick)
    record("bf16_matmul_peak_tflops", peak, f"bf16 matmul peak measured here: {peak:.0f} TFLOP/s")
    images = [image.hr for image in sample_images("train") if min(image.hr.shape[1:]) >= 400]
    bank = ImageBank(images, device)
    cases = [("srresnet", 4), ("edsr_baseline", 2)]
    patches, batches = ((24,), (4,)) if quick else ((48, 96), (16, 64))
    modes = ("fp32", "bf16_cl") if quick else tuple(MODES)
    rates = {}
    for name, scale in cases:
        for lr_patch in patches:
            for batch in batches:
                for mode in modes:
                    compiled = MODES[mode][2]
                    if compiled and (lr_patch, batch) != (48, 64):
                        continue  # compiling each shape costs ~a minute: one shape per model
                    key = f"{name}_x{scale}_p{lr_patch}_b{batch}_{mode}"
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    loop = Loop(name, scale, lr_patch, batch, mode, bank)
                    flops = loop.flops()
                    seconds = timed(
                        device,
                        lambda step, loop=loop: loop.step(*loop.sampler.batch(step)),
                        warmup=2 if quick else (30 if compiled else 8),
                        min_seconds=0.2 if quick else 1.5,
                        min_steps=2 if quick else 20,
                    )
                    sampler_seconds = timed(
                        device,
                        loop.sampler.batch,
                        warmup=2,
                        min_seconds=0.1 if quick else 0.5,
                        min_steps=2 if quick else 20,
                    )
                    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                    achieved = flops / seconds / 1e12
                    rates[key] = batch / seconds
                    record(
                        key,
                        {
                            "patches_per_s": batch / seconds,
                            "step_ms": seconds * 1e3,
                            "gflop_per_step": flops / 1e9,
                            "tflops": achieved,
                            "share_of_peak": achieved / peak,
                            "sampler_share": sampler_seconds / seconds,
                            "peak_memory_gib": memory,
                        },
                        f"{key:<40} {batch / seconds:>9,.0f} patches/s  {seconds * 1e3:7.2f} ms/step  "
                        f"{achieved:6.1f} TFLOP/s ({achieved / peak:5.1%} of peak)  "
                        f"sampler {sampler_seconds / seconds:5.1%}  {memory:5.1f} GiB",
                    )
    return rates


# --- 3. the classic pipeline -------------------------------------------------------------------------------


def classic(device: torch.device, quick: bool, record: Recorder, ours: dict[str, float]) -> None:
    images = [image for image in sample_images("train") if min(image.hr.shape[1:]) >= 400]
    cases = (
        [("srresnet", 4, 24, 4)]
        if quick
        else [("srresnet", 4, 48, 16), ("edsr_baseline", 2, 48, 16), ("edsr_baseline", 2, 48, 64)]
    )
    mode = "fp32" if quick else "bf16_cl"
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for image in images:
            files.append(Path(folder) / f"{image.name}.png")
            Image.fromarray(image.hr.permute(1, 2, 0).numpy()).save(files[-1])
        for name, scale, lr_patch, batch in cases:
            loop = Loop(name, scale, lr_patch, batch, mode, ImageBank([i.hr for i in images], device))
            steps = 4 if quick else 150
            dataset = ClassicPatches(files, lr_patch * scale, scale, (steps + 20) * batch, strength=0.0, color="rgb")
            loader = DataLoader(
                dataset,
                batch_size=batch,
                num_workers=2 if quick else 8,
                pin_memory=device.type == "cuda",
                persistent_workers=True,
                prefetch_factor=4,
            )
            batches = iter(loader)

            def run(step: int, batches=batches, loop=loop) -> None:
                lr, hr = next(batches)
                loop.step(lr.to(device, non_blocking=True), hr.to(device, non_blocking=True))

            seconds = timed(device, run, warmup=10 if not quick else 1, min_seconds=0.0, min_steps=steps)
            key = f"{name}_x{scale}_p{lr_patch}_b{batch}_{mode}"
            rate = batch / seconds
            ratio = ours.get(key, float("nan")) / rate
            record(
                f"classic_{key}",
                {"patches_per_s": rate, "ours_patches_per_s": ours.get(key), "ours_over_classic": ratio},
                f"classic DataLoader {key:<34} {rate:>9,.0f} patches/s; "
                f"ours {ours.get(key, float('nan')):,.0f} = {ratio:.2f}x",
            )


# --- 4. host syncs -----------------------------------------------------------------------------------------


def host_syncs(device: torch.device, quick: bool, record: Recorder) -> None:
    if device.type != "cuda":
        record("host_syncs_per_step", None, "host syncs: CUDA only (set_sync_debug_mode)")
        return
    for name, scale, extra in (
        ("fsrcnn", 2, ["data.augment_strength=0.5", "data.color_jitter=true"]),
        ("srresnet", 4, ["data.color=rgb", "optimizer.ema_decay=0.999"]),
    ):
        places = {}
        for steps in (5, 25):
            config = load_config(
                None,
                [
                    f"model.name={name}",
                    f"model.scale={scale}",
                    f"training.steps={steps}",
                    f"training.eval_interval={steps}",
                    "data.val_crop=48",
                    *extra,
                ],
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train(config, device=device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            places[steps] = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        # Set-up and the one evaluation are the same in both runs: what grows with the steps is per step.
        per_place = {place: (places[25][place] - places[5][place]) / 20 for place in places[25]}
        per_place = {place: count for place, count in per_place.items() if count}
        per_step = sum(per_place.values())
        record(
            f"host_syncs_{name}",
            {
                "per_step": per_step,
                "per_step_by_place": per_place,
                "totals": {k: sum(v.values()) for k, v in places.items()},
            },
            f"host syncs per training step, {name} x{scale}: {per_step:g} {per_place}",
        )


# --- 5. what bounds a step, and torch.compile through the engine ----------------------------------------------


def profile(device: torch.device, quick: bool, record: Recorder) -> None:
    """GPU busy time against wall time per step, and the kernels that take it, for the best settings."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    images = [image.hr for image in sample_images("train") if min(image.hr.shape[1:]) >= 400]
    bank = ImageBank(images, device)
    cases = [("srresnet", 4, 24, 4)] if quick else [("srresnet", 4, 48, 64), ("edsr_baseline", 2, 96, 64)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, scale, lr_patch, batch in cases:
        loop = Loop(name, scale, lr_patch, batch, "bf16_cl", bank)
        for step in range(5):
            loop.step(*loop.sampler.batch(step))
        synchronize(device)
        steps = 2 if quick else 10
        with profiler(activities=activities) as prof:
            start = time.perf_counter()
            for step in range(steps):
                loop.step(*loop.sampler.batch(100 + step))
            synchronize(device)
            wall = (time.perf_counter() - start) / steps
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
        kernel = sum(e.self_device_time_total for e in events) / 1e6 / steps  # microseconds -> seconds
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
        table = [(e.key[:90], e.self_device_time_total / 1e3 / steps, e.count // steps) for e in top]
        key = f"profile_{name}_x{scale}_p{lr_patch}_b{batch}_bf16_cl"
        record(
            key,
            {
                "wall_ms": wall * 1e3,
                "gpu_busy_ms": kernel * 1e3,
                "gpu_busy_share": kernel / wall,
                "kernels_per_step": sum(e.count for e in events) // steps,
                "top": table,
            },
            f"{key}: {wall * 1e3:.1f} ms/step wall, GPU busy {kernel * 1e3:.1f} ms ({kernel / wall:.0%}), "
            f"{sum(e.count for e in events) // steps} kernels/step; top: "
            + "; ".join(f"{k} {ms:.2f} ms x{n}" for k, ms, n in table[:5]),
        )


def engine_compile(device: torch.device, quick: bool, record: Recorder) -> None:
    """``training.compile`` on and off through ``engine.train``: patches/s of the last evaluation window."""
    steps, patch, batch = (6, 16, 4) if quick else (300, 48, 64)
    for compiled in (False, True):
        config = load_config(
            None,
            [
                "model.name=edsr_baseline",
                "model.scale=2",
                "data.color=rgb",
                f"data.lr_patch_size={patch}",
                f"data.batch_size={batch}",
                "data.val_crop=48",
                f"training.steps={steps}",
                f"training.eval_interval={steps // 3}",
                f"training.compile={str(compiled).lower()}",
            ],
        )
        started = time.perf_counter()
        history = train(config, device=device).history
        rate = history[-1].patches_per_second
        record(
            f"engine_edsr_x2_p48_b64_compile_{compiled}",
            {"patches_per_s_last_window": rate, "wall_s": time.perf_counter() - started, "psnr": history[-1].psnr},
            f"engine.train EDSR x2 LR48 b64 bf16+CL compile={compiled}: {rate:,.0f} patches/s (last window), "
            f"{time.perf_counter() - started:.0f} s in all, PSNR {history[-1].psnr:.2f} dB",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the code paths, not the speed")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json")
    parts = ["correctness", "throughput", "classic", "syncs", "profile", "compile"]
    parser.add_argument("--skip", nargs="*", default=[], choices=parts)
    args = parser.parse_args()
    device = torch.device(args.device)
    record = Recorder(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record("device", {"name": name, "torch": torch.__version__}, f"device {name}, torch {torch.__version__}")
    started = time.perf_counter()
    if "correctness" not in args.skip:
        correctness(device, args.quick, record)
    ours = throughput(device, args.quick, record) if "throughput" not in args.skip else {}
    if "classic" not in args.skip:
        classic(device, args.quick, record, ours)
    if "syncs" not in args.skip:
        host_syncs(device, args.quick, record)
    if "profile" not in args.skip:
        profile(device, args.quick, record)
    if "compile" not in args.skip:
        engine_compile(device, args.quick, record)
    record("seconds", time.perf_counter() - started, f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
