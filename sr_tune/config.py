"""Typed, frozen run configuration: YAML + ``key=value`` overrides -> ``TrainConfig``, validated once.

Every section is a ``@dataclass(frozen=True, kw_only=True)`` built with ``fields.setting``: each field
carries its help text and its allowed range. ``load_config`` collects *every* problem (unknown keys with a
suggestion, wrong types, out-of-range values, contradictions between sections) and raises one
``ConfigError`` that names each key, the bad value and what is allowed. Models and the data pipeline never
see these objects (builders turn sections into plain arguments); the loss and optimizer builders take their
own section (``LossConfig``, ``OptimizerConfig``), which is all they read.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sr_tune.credentials import credential_problem
from sr_tune.fields import (
    INVALID,
    ConfigError,
    build,
    coerce,
    parse_override,
    parse_yaml,
    plain,
    setting,
    type_name,
    validate,
    with_values,
)
from sr_tune.models import SUPPORTED_SCALES, get_builder, list_models
from sr_tune.models.registry import out_of_range, size_problem


def _known_model(name: str) -> str | None:
    if name in list_models():
        return None
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"is not a registered model{hint}; allowed: {', '.join(list_models())}"


def _supported_scale(scale: int) -> str | None:
    return None if scale in SUPPORTED_SCALES else f"is not supported (allowed: {', '.join(map(str, SUPPORTED_SCALES))})"


def _no_channels(kwargs: dict[str, Any]) -> str | None:
    return "sets in_channels: set data.color (y -> 1 channel, rgb -> 3) instead" if "in_channels" in kwargs else None


def _device_name(device: str) -> str | None:
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    return None if ok else "is not valid (allowed: auto, cpu, cuda, cuda:N)"


def _val_crop(side: int) -> str | None:
    return None if side == 0 or side >= 16 else "is out of range (allowed: 0 for whole images, or >= 16)"


def _no_credentials(uri: str | None) -> str | None:
    return credential_problem(uri) if uri else None


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def path_name_problem(name: str | None) -> str | None:
    """Why ``name`` cannot name a folder (None when it can): it becomes one under an output or storage root,
    so only letters, digits, '.', '_' and '-', and not '.' or '..' (no separator, nothing absolute)."""
    if name is None or (_SAFE_NAME.fullmatch(name) and name not in (".", "..")):
        return None
    return "is not a valid name (allowed: letters, digits, '.', '_' and '-'; it names a folder)"


def _betas(betas: tuple[float, float]) -> str | None:
    return None if all(0.0 <= b < 1.0 for b in betas) else "is out of range (allowed: each in [0, 1))"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = setting("srcnn_915", "registered model name (`sr-tune models` lists them)", check=_known_model)
    scale: int = setting(3, "upscaling factor: 2, 3 or 4", check=_supported_scale)
    kwargs: dict[str, Any] = setting(
        {}, "extra constructor arguments of the model (e.g. depth for vdsr)", check=_no_channels
    )

    def __post_init__(self) -> None:
        problems = _model_kwargs_problems(self.name, self.kwargs)
        if (
            not problems
            and self.name in list_models()
            and self.scale in SUPPORTED_SCALES
            and "in_channels" not in self.kwargs
        ):
            # in_channels 3, the larger of the two colour modes
            if too_large := size_problem(self.name, scale=self.scale, in_channels=3, **self.kwargs):
                problems.append(f"model: {self.name} x{self.scale} with kwargs {self.kwargs!r} {too_large}")
        validate(self, problems)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: str = setting(
        "sample", "training images: 'sample' (built-in photographs) or a source spec", check=_no_credentials
    )
    val: str = setting("sample", "validation images, same forms as train", check=_no_credentials)
    color: Literal["y", "rgb"] = setting("y", "train on BT.601 luma (1 channel) or on RGB (3 channels)")
    lr_patch_size: int = setting(11, "LR patch side; the HR patch is lr_patch_size * scale", ge=4)
    batch_size: int = setting(16, "patches per optimizer step (per worker)", ge=1)
    blur_sigma: float = setting(0.0, "Gaussian blur sigma before bicubic downscaling (0 = none)", ge=0.0)
    quantize_lr: bool = setting(
        True,
        "round LR to 8-bit levels, as images stored on disk are; validation then also rounds outputs to 8 bits "
        "before PSNR/SSIM (the paper protocol of `sr-tune eval`)",
    )
    augment_strength: float = setting(
        0.0, "scales every warp and colour-jitter range: 0 = off, 1 = widest", ge=0.0, le=1.0
    )
    flip_rot: bool = setting(True, "random flips and 90-degree rotations of each patch")
    color_jitter: bool = setting(False, "random brightness, contrast and saturation (ranges scaled by strength)")
    val_crop: int = setting(
        96, "HR side of the centre crop of each validation image (0 = whole images)", check=_val_crop
    )
    skip_bad: bool = setting(False, "skip unreadable images with a warning naming each (default: stop)")

    def __post_init__(self) -> None:
        validate(self)


PIXEL_LOSSES = ("mse", "l1", "charbonnier")


def _mix_weights(mix: dict[str, Any]) -> str | None:
    for name, weight in mix.items():
        if name not in PIXEL_LOSSES:
            return f"{name!r} is not a pixel loss (allowed: {', '.join(PIXEL_LOSSES)})"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            return f"{name}: {weight!r} is not a weight (a number >= 0)"
    return None


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    pixel: Literal["mse", "l1", "charbonnier"] = setting("mse", "pixel loss between SR and HR")
    pixel_weight: float = setting(1.0, "weight of the pixel loss (0 = off)", ge=0.0)
    charbonnier_eps: float = setting(1e-3, "epsilon of the Charbonnier loss sqrt(d^2 + eps^2)", gt=0.0)
    mix: dict[str, Any] = setting(
        {},
        "extra pixel terms beside pixel, by weight: {mse|l1|charbonnier: weight} (e.g. {mse: 0.1})",
        check=_mix_weights,
    )
    perceptual: Literal["none", "vgg22", "vgg54"] = setting(
        "none", "VGG19 feature loss: relu2_2 (vgg22) or relu5_4 (vgg54), ImageNet weights"
    )
    perceptual_weight: float = setting(1.0, "weight of the perceptual loss", ge=0.0)
    adversarial: Literal["none", "bce", "relativistic"] = setting(
        "none", "GAN loss with an SRGAN discriminator: BCE-with-logits, or relativistic average BCE"
    )
    adversarial_weight: float = setting(1e-3, "weight of the generator's adversarial loss", ge=0.0)

    def __post_init__(self) -> None:
        problems = [f"mix: {self.pixel!r} is the pixel loss already"] if self.pixel in self.mix else []
        weights = (
            self.pixel_weight,
            *self.mix.values(),
            self.perceptual_weight if self.perceptual != "none" else 0.0,
            self.adversarial_weight if self.adversarial != "none" else 0.0,
        )
        problems += [] if any(w > 0 for w in weights) else ["pixel_weight: every loss term has weight 0"]
        validate(self, problems)


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = setting("adam", "optimizer")
    lr: float = setting(1e-3, "learning rate", gt=0.0, le=10.0)
    weight_decay: float = setting(0.0, "L2 penalty (decoupled for adamw)", ge=0.0)
    momentum: float = setting(0.9, "momentum for sgd and rmsprop", ge=0.0, lt=1.0)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas", check=_betas)
    grad_clip_norm: float = setting(0.0, "clip the global gradient norm to this (0 = off)", ge=0.0)
    last_layer_lr_scale: float = setting(
        1.0, "learning rate of the model's last layer relative to lr (SRCNN: 0.1)", gt=0.0
    )
    schedule: Literal["constant", "step", "cosine"] = setting("constant", "learning-rate schedule")
    warmup_steps: int = setting(0, "linear warm-up from 0 over this many steps", ge=0)
    step_size: int = setting(1000, "step schedule: multiply by gamma every this many steps", ge=1)
    gamma: float = setting(0.5, "step schedule: decay factor", gt=0.0, le=1.0)
    min_lr_ratio: float = setting(0.0, "cosine schedule: final lr as a fraction of lr", ge=0.0, le=1.0)
    ema_decay: float = setting(0.0, "exponential moving average of the weights (0 = off; e.g. 0.999)", ge=0.0, lt=1.0)
    discriminator_lr: float | None = setting(None, "GAN runs: discriminator learning rate (default: lr)")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    steps: int = setting(1000, "optimizer steps", ge=1)
    eval_interval: int = setting(100, "evaluate every this many steps (and at the end)", ge=1)
    seed: int = setting(0, "seed for weights and patch sampling", ge=0)
    device: str = setting("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'", check=_device_name)
    output_dir: str = setting("runs", "folder for checkpoints and run files")
    bf16: bool = setting(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = setting(True, "channels-last memory format on CUDA (ignored on CPU)")
    compile: bool = setting(
        False,
        "torch.compile the network for training on CUDA (ignored on CPU): faster steps after about a minute "
        "of compiling; worth it for long runs",
    )
    init_from: str | None = setting(None, "checkpoint folder whose weights start this run (fine-tuning)")
    init_reinit: tuple[str, ...] = setting(
        (), "with init_from: parameter-name prefixes that may differ in shape and stay freshly initialised"
    )

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    num_workers: int = setting(0, "Ray Train workers; 0 = run in this process without Ray", ge=0)
    use_gpu: bool = setting(False, "one GPU per worker (DDP over NCCL); otherwise CPU workers over gloo")
    cpus_per_worker: float = setting(1.0, "CPUs Ray reserves for each worker", gt=0.0)
    storage_path: str | None = setting(
        None,
        "Ray storage for checkpoints: a folder or pyarrow.fs URI (default: training.output_dir/ray)",
        check=_no_credentials,
    )
    max_failures: int = setting(0, "restart from the last checkpoint this many times after a worker failure", ge=0)
    keep_checkpoints: int = setting(2, "checkpoints kept in Ray storage (best by val_psnr)", ge=1)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    enabled: bool = setting(True, "log the run to MLflow")
    tracking_uri: str = setting(
        "sqlite:///mlflow.db",
        "MLflow tracking URI (a SQLite file or a server); MLFLOW_TRACKING_URI overrides it",
        check=_no_credentials,
    )
    experiment: str = setting("sr_tune", "MLflow experiment name")
    run_name: str | None = setting(
        None, "MLflow run name and the run's folder (default: model and scale)", check=path_name_problem
    )

    def __post_init__(self) -> None:
        validate(self)


def _bounds_problem(values: tuple[float, ...], *, positive: bool) -> str | None:
    if not values:
        return None
    if len(values) != 3:
        return "expected [initial, low, high], or [] to leave it untuned"
    initial, low, high = values
    if not low < initial < high:
        return "expected low < initial < high"
    if positive and low <= 0:
        return "is tuned on a log scale: low must be above 0"
    if not positive and not 0 <= low < high <= 1:
        return "is a strength: low and high must lie in [0, 1]"
    return None


def _log_bounds(values: tuple[float, ...]) -> str | None:
    return _bounds_problem(values, positive=True)


def _unit_bounds(values: tuple[float, ...]) -> str | None:
    return _bounds_problem(values, positive=False)


def _pixel_mix(mix: dict[str, Any]) -> str | None:
    for name, values in mix.items():
        if name not in PIXEL_LOSSES:
            return f"{name!r} is not a pixel loss (allowed: {', '.join(PIXEL_LOSSES)})"
        is_numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )
        if not is_numbers or not values:
            return f"{name}: {values!r} is not [initial, low, high]"
        if problem := _log_bounds(tuple(values)):
            return f"{name}: {problem}"
    return None


@dataclass(frozen=True, kw_only=True)
class DeltaStnConfig:
    """Delta-STN: regularisation-type hyperparameters tuned online inside one run (``sr_tune.delta_stn``)."""

    enabled: bool = setting(
        False,
        "tune l2, augment_strength and pixel_mix below inside this one run (Delta-STN); lr, batch size and the "
        "architecture stay with sweeps",
    )
    l2: tuple[float, ...] = setting(
        (),
        "[initial, low, high] of the L2 weight on ||w||^2 in the training loss (log scale); [] = not tuned",
        check=_log_bounds,
    )
    augment_strength: tuple[float, ...] = setting(
        (),
        "[initial, low, high] of each patch's augmentation strength, within [0, 1]; [] = not tuned",
        check=_unit_bounds,
    )
    pixel_mix: dict[str, Any] = setting(
        {},
        "extra pixel terms beside loss.pixel, whose weight stays fixed: {mse|l1|charbonnier: [initial, low, high]} "
        "(log scale)",
        check=_pixel_mix,
    )
    interval: int = setting(5, "training steps per hyperparameter step", ge=1)
    warmup_steps: int = setting(
        200, "steps before the first hyperparameter step: the response weights learn first", ge=0
    )
    perturbation: float = setting(
        0.5, "initial scale of each patch's perturbation of the hyperparameters (unconstrained space)", gt=0.0
    )
    max_perturbation: float = setting(1.0, "the largest perturbation scale tune_scales may reach", gt=0.0)
    tune_scales: bool = setting(True, "learn the perturbation scales too, with an entropy bonus that keeps them open")
    entropy_weight: float = setting(1e-3, "weight of that entropy bonus", ge=0.0)
    hyper_lr: float = setting(
        0.05, "Adam learning rate of the hyperparameters (log values, logits) and their scales", gt=0.0
    )
    objective: Literal["l1", "psnr"] = setting(
        "l1", "the hyperparameter step's fixed objective on validation patches: L1, or PSNR on the model's channels"
    )
    val_batch_size: int = setting(0, "validation patches per hyperparameter step (0: data.batch_size)", ge=0)

    def __post_init__(self) -> None:
        tunes = self.l2 or self.augment_strength or self.pixel_mix
        problems = (
            [] if tunes or not self.enabled else ["enabled: nothing to tune (set l2, augment_strength or pixel_mix)"]
        )
        if self.perturbation > self.max_perturbation:
            problems.append(
                f"perturbation: {self.perturbation:g} is above max_perturbation ({self.max_perturbation:g})"
            )
        validate(self, problems)

    @property
    def tuned(self) -> tuple[str, ...]:
        """The tuned hyperparameters' names: l2, augment_strength, then one ``mix_<loss>`` per extra pixel term."""
        names = ("l2",) * bool(self.l2) + ("augment_strength",) * bool(self.augment_strength)
        return names + tuple(f"mix_{name}" for name in self.pixel_mix)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = setting(ModelConfig, "the network")
    data: DataConfig = setting(DataConfig, "images, patches and degradation")
    loss: LossConfig = setting(LossConfig, "loss terms and weights")
    optimizer: OptimizerConfig = setting(OptimizerConfig, "optimizer and its settings")
    training: TrainingConfig = setting(TrainingConfig, "steps, evaluation, seed, device")
    distributed: DistributedConfig = setting(DistributedConfig, "Ray Train workers and storage")
    tracking: TrackingConfig = setting(TrackingConfig, "MLflow")
    delta_stn: DeltaStnConfig = setting(DeltaStnConfig, "Delta-STN: hyperparameters tuned inside the run")

    def __post_init__(self) -> None:
        validate(self, _delta_stn_problems(self) if self.delta_stn.enabled else [])

    @property
    def in_channels(self) -> int:
        return 1 if self.data.color == "y" else 3

    @property
    def run_name(self) -> str:
        """Deterministic (no timestamp), so a rerun with the same storage path finds and resumes the run."""
        return self.tracking.run_name or f"{self.model.name}_x{self.model.scale}"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that ``TrainConfig.from_dict`` reads back."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
        """Build and validate from a nested mapping; raises one ``ConfigError`` listing every problem."""
        problems: list[str] = []
        config = build(cls, expand_home(data), "", problems)
        if problems or config is None:
            raise ConfigError(problems, source)
        return config


def _delta_stn_problems(config: TrainConfig) -> list[str]:
    """What a Delta-STN run cannot combine with: each problem names both keys."""
    stn, problems = config.delta_stn, []
    if config.loss.adversarial != "none" or config.loss.perceptual != "none":
        problems.append(
            "delta_stn.enabled: tunes pixel-loss runs only; set loss.adversarial and loss.perceptual to none"
        )
    if stn.l2 and config.optimizer.weight_decay > 0:
        problems.append("delta_stn.l2: tunes the L2 weight itself; set optimizer.weight_decay to 0")
    if stn.augment_strength and config.data.augment_strength > 0:
        problems.append("delta_stn.augment_strength: tunes the strength itself; set data.augment_strength to 0")
    if config.loss.pixel in stn.pixel_mix:
        problems.append(
            f"delta_stn.pixel_mix: {config.loss.pixel!r} is loss.pixel, the fixed term the mix is relative to"
        )
    problems += [
        f"delta_stn.pixel_mix: tunes {name!r} itself; remove loss.mix.{name}"
        for name in stn.pixel_mix
        if name in config.loss.mix
    ]
    if config.model.name in ("srresnet", "srgan"):
        problems.append(f"delta_stn.enabled: {config.model.name} has BatchNorm, which mixes per-patch hyperparameters")
    return problems


def _model_kwargs_problems(name: str, kwargs: Mapping[str, Any]) -> list[str]:
    """Check model ``kwargs`` names and types against the registered builder's signature."""
    if name not in list_models():
        return []  # the unknown name is reported on its own
    builder = get_builder(name)
    hints = typing.get_type_hints(builder)
    accepted = sorted(set(inspect.signature(builder).parameters) - {"scale", "in_channels"})
    problems: list[str] = []
    for key, value in kwargs.items():
        if key == "in_channels":
            continue  # reported by the field's own check
        if key in accepted:
            coerced = coerce(value, hints[key], f"kwargs.{key}", problems)
            if coerced is not INVALID:
                problems += [f"kwargs.{problem}" for problem in out_of_range(name, {key: coerced})]
        else:
            problems.append(f"kwargs.{key}: {name} has no argument {key!r} (allowed: {', '.join(accepted) or 'none'})")
    return problems


# --- files and overrides -------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"cannot read config file: {error.strerror}"], str(path)) from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(
            ["the file is empty: to train on the defaults, write them out with `sr-tune config > FILE` and use that"],
            str(path),
        )
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict copy.

    Returns the new dict and the problems with malformed overrides.
    """
    values, problems = {}, []
    for override in overrides:
        parsed = parse_override(override)
        if parsed is None or any(not part for part in parsed[0].split(".")):
            problems.append(f"override {override!r}: expected section.key=value")
            continue
        values[parsed[0]] = parsed[1]
    result, value_problems = with_values(data, values)
    return result, problems + [f"override {p}" for p in value_problems]


# Keys that name a local folder: ``~`` in them is the user's home, as in a shell.
PATH_KEYS = (
    ("data", "train"),
    ("data", "val"),
    ("training", "output_dir"),
    ("training", "init_from"),
    ("distributed", "storage_path"),
)


def expand_home(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with a leading ``~`` of every ``PATH_KEYS`` value expanded to the home folder."""
    expanded = {name: dict(section) if isinstance(section, Mapping) else section for name, section in data.items()}
    for name, key in PATH_KEYS:
        section = expanded.get(name)
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key].startswith("~"):
            section[key] = os.path.expanduser(section[key])
    return expanded


def config_values(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw nested values of a YAML file plus ``key=value`` overrides, before any check (``~`` expanded)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return expand_home(apply_overrides(data, overrides)[0])


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a ``TrainConfig`` from a YAML file (or the defaults) plus ``key=value`` overrides."""
    source = str(path) if path is not None else "defaults"
    data = _read_yaml(Path(path)) if path is not None else {}
    data, override_problems = apply_overrides(data, overrides)
    data = expand_home(data)
    problems: list[str] = list(override_problems)
    config = build(TrainConfig, data, "", problems)
    if problems or config is None:
        labelled = [_label_override(problem, overrides) for problem in problems]
        if labelled != problems or override_problems:
            source += " and its command-line overrides"
        raise ConfigError(labelled, source)
    return config


def _label_override(problem: str, overrides: Sequence[str]) -> str:
    """``problem`` with the command-line override that set its key, so it is not blamed on the file."""
    key = problem.partition(":")[0]
    for override in overrides:
        set_key = override.partition("=")[0]
        if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
            return f"{problem} (from the override {override!r})"
    return problem


def describe_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field: the reference `sr-tune config` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", type_name(tp), default, f.metadata.get("help", "")))
    return rows
