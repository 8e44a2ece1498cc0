"""Typed, frozen run configuration: YAML + ``key=value`` overrides -> ``TrainConfig``, validated once.

Every section is a ``@dataclass(frozen=True, kw_only=True)``; each field carries its help text and its
allowed range in ``metadata``. ``load_config`` collects *every* problem (unknown keys with a suggestion,
wrong types, out-of-range values, contradictions between sections) and raises one ``ConfigError`` that
names each key, the bad value and what is allowed. Models, losses and samplers never see these objects:
builders turn sections into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sr_tune.models import get_builder, list_models


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` lists each one as ``"key: what is wrong"``."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


def _field(default: Any, help: str, check: Callable[[Any], str | None] | None = None, **bounds: float) -> Any:
    """A config field with its help text, optional bounds (``ge``, ``gt``, ``le``, ``lt``) and an optional
    ``check(value) -> problem or None`` for rules a type cannot say."""
    metadata = {"help": help, "check": check, **bounds}
    if isinstance(default, type):  # a section: built on use, after this module has loaded
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _field_problems(cls: type, values: Mapping[str, Any]) -> list[str]:
    """Per-field problems of section ``cls``: out-of-range numbers and failed ``check``s."""
    problems = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        check = f.metadata.get("check")
        if check is not None and (problem := check(value)):
            problems.append(f"{f.name}: {value!r} {problem}")
        bounds = {k: v for k, v in f.metadata.items() if k in _BOUND_TEXT}
        if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        within = {"ge": value.__ge__, "gt": value.__gt__, "le": value.__le__, "lt": value.__lt__}
        if not all(within[kind](bound) for kind, bound in bounds.items()):
            allowed = " and ".join(f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items())
            problems.append(f"{f.name}: {value!r} is out of range (allowed: {allowed})")
    return problems


def _check(instance: Any, extra: Sequence[str] = ()) -> None:
    """Raise one ``ConfigError`` for the section's per-field problems and its cross-field ``extra`` ones."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    problems = _field_problems(type(instance), values) + list(extra)
    if problems:
        raise ConfigError(problems)


def _known_model(name: str) -> str | None:
    if name in list_models():
        return None
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"is not a registered model{hint}; allowed: {', '.join(list_models())}"


def _supported_scale(scale: int) -> str | None:
    return None if scale in (2, 3, 4) else "is not supported (allowed: 2, 3, 4)"


def _no_channels(kwargs: dict[str, Any]) -> str | None:
    return "sets in_channels: set data.color (y -> 1 channel, rgb -> 3) instead" if "in_channels" in kwargs else None


def _device_name(device: str) -> str | None:
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    return None if ok else "is not valid (allowed: auto, cpu, cuda, cuda:N)"


def _val_crop(side: int) -> str | None:
    return None if side == 0 or side >= 16 else "is out of range (allowed: 0 for whole images, or >= 16)"


def _betas(betas: tuple[float, float]) -> str | None:
    return None if all(0.0 <= b < 1.0 for b in betas) else "is out of range (allowed: each in [0, 1))"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = _field("srcnn_915", "registered model name (`sr-tune models` lists them)", check=_known_model)
    scale: int = _field(3, "upscaling factor: 2, 3 or 4", check=_supported_scale)
    kwargs: dict[str, Any] = _field(
        {}, "extra constructor arguments of the model (e.g. depth for vdsr)", check=_no_channels
    )

    def __post_init__(self) -> None:
        _check(self, _model_kwargs_problems(self.name, self.kwargs))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: str = _field("sample", "training images: 'sample' (built-in photographs) or a source spec")
    val: str = _field("sample", "validation images, same forms as train")
    color: Literal["y", "rgb"] = _field("y", "train on BT.601 luma (1 channel) or on RGB (3 channels)")
    lr_patch_size: int = _field(11, "LR patch side; the HR patch is lr_patch_size * scale", ge=4)
    batch_size: int = _field(16, "patches per optimizer step (per worker)", ge=1)
    blur_sigma: float = _field(0.0, "Gaussian blur sigma before bicubic downscaling (0 = none)", ge=0.0)
    augment_strength: float = _field(
        0.0, "scales every warp and colour-jitter range: 0 = off, 1 = widest", ge=0.0, le=1.0
    )
    flip_rot: bool = _field(True, "random flips and 90-degree rotations of each patch")
    color_jitter: bool = _field(False, "random brightness, contrast and saturation (ranges scaled by strength)")
    val_crop: int = _field(96, "HR side of the centre crop of each validation image (0 = whole images)",
                           check=_val_crop)  # fmt: skip
    skip_bad: bool = _field(False, "skip unreadable images with a warning naming each (default: stop)")

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    pixel: Literal["mse", "l1", "charbonnier"] = _field("mse", "pixel loss between SR and HR")
    pixel_weight: float = _field(1.0, "weight of the pixel loss (0 = off)", ge=0.0)
    charbonnier_eps: float = _field(1e-3, "epsilon of the Charbonnier loss sqrt(d^2 + eps^2)", gt=0.0)
    perceptual: Literal["none", "vgg22", "vgg54"] = _field(
        "none", "VGG19 feature loss: relu2_2 (vgg22) or relu5_4 (vgg54), ImageNet weights"
    )
    perceptual_weight: float = _field(1.0, "weight of the perceptual loss", ge=0.0)
    adversarial: Literal["none", "bce", "relativistic"] = _field(
        "none", "GAN loss with an SRGAN discriminator: BCE-with-logits, or relativistic average BCE"
    )
    adversarial_weight: float = _field(1e-3, "weight of the generator's adversarial loss", ge=0.0)

    def __post_init__(self) -> None:
        weights = (self.pixel_weight, self.perceptual_weight if self.perceptual != "none" else 0.0,
                   self.adversarial_weight if self.adversarial != "none" else 0.0)  # fmt: skip
        _check(self, [] if any(w > 0 for w in weights) else ["pixel_weight: every loss term has weight 0"])


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = _field("adam", "optimizer")
    lr: float = _field(1e-3, "learning rate", gt=0.0, le=10.0)
    weight_decay: float = _field(0.0, "L2 penalty (decoupled for adamw)", ge=0.0)
    momentum: float = _field(0.9, "momentum for sgd and rmsprop", ge=0.0, lt=1.0)
    betas: tuple[float, float] = _field((0.9, 0.999), "Adam betas", check=_betas)
    grad_clip_norm: float = _field(0.0, "clip the global gradient norm to this (0 = off)", ge=0.0)
    last_layer_lr_scale: float = _field(
        1.0, "learning rate of the model's last layer relative to lr (SRCNN: 0.1)", gt=0.0
    )
    schedule: Literal["constant", "step", "cosine"] = _field("constant", "learning-rate schedule")
    warmup_steps: int = _field(0, "linear warm-up from 0 over this many steps", ge=0)
    step_size: int = _field(1000, "step schedule: multiply by gamma every this many steps", ge=1)
    gamma: float = _field(0.5, "step schedule: decay factor", gt=0.0, le=1.0)
    min_lr_ratio: float = _field(0.0, "cosine schedule: final lr as a fraction of lr", ge=0.0, le=1.0)
    ema_decay: float = _field(0.0, "exponential moving average of the weights (0 = off; e.g. 0.999)",
                              ge=0.0, lt=1.0)  # fmt: skip
    discriminator_lr: float | None = _field(None, "GAN runs: discriminator learning rate (default: lr)")

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    steps: int = _field(1000, "optimizer steps", ge=1)
    eval_interval: int = _field(100, "evaluate every this many steps (and at the end)", ge=1)
    seed: int = _field(0, "seed for weights and patch sampling", ge=0)
    device: str = _field("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'", check=_device_name)
    output_dir: str = _field("runs", "folder for checkpoints and run files")
    bf16: bool = _field(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = _field(True, "channels-last memory format on CUDA (ignored on CPU)")
    init_from: str | None = _field(None, "checkpoint folder whose weights start this run (fine-tuning)")
    init_reinit: tuple[str, ...] = _field(
        (), "with init_from: parameter-name prefixes that may differ in shape and stay freshly initialised"
    )

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    num_workers: int = _field(0, "Ray Train workers; 0 = run in this process without Ray", ge=0)
    use_gpu: bool = _field(False, "one GPU per worker (DDP over NCCL); otherwise CPU workers over gloo")
    cpus_per_worker: float = _field(1.0, "CPUs Ray reserves for each worker", gt=0.0)
    storage_path: str | None = _field(None, "Ray storage for checkpoints: a folder or pyarrow.fs URI "
                                            "(default: training.output_dir/ray)")  # fmt: skip
    max_failures: int = _field(0, "restart from the last checkpoint this many times after a worker failure",
                               ge=0)  # fmt: skip
    keep_checkpoints: int = _field(2, "checkpoints kept in Ray storage (best by val_psnr)", ge=1)

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    enabled: bool = _field(True, "log the run to MLflow")
    tracking_uri: str = _field("sqlite:///mlflow.db", "MLflow tracking URI (a SQLite file or a server); "
                                                      "MLFLOW_TRACKING_URI overrides it")  # fmt: skip
    experiment: str = _field("sr_tune", "MLflow experiment name")
    run_name: str | None = _field(None, "MLflow run name (default: model and scale)")

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = _field(ModelConfig, "the network")
    data: DataConfig = _field(DataConfig, "images, patches and degradation")
    loss: LossConfig = _field(LossConfig, "loss terms and weights")
    optimizer: OptimizerConfig = _field(OptimizerConfig, "optimizer and its settings")
    training: TrainingConfig = _field(TrainingConfig, "steps, evaluation, seed, device")
    distributed: DistributedConfig = _field(DistributedConfig, "Ray Train workers and storage")
    tracking: TrackingConfig = _field(TrackingConfig, "MLflow")

    def __post_init__(self) -> None:
        _check(self)

    @property
    def in_channels(self) -> int:
        return 1 if self.data.color == "y" else 3

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that ``TrainConfig.from_dict`` reads back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
        """Build and validate from a nested mapping; raises one ``ConfigError`` listing every problem."""
        problems: list[str] = []
        config = _build(cls, data, "", problems)
        if problems or config is None:
            raise ConfigError(problems, source)
        return config


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
            _coerce(value, hints[key], f"kwargs.{key}", problems)
        else:
            problems.append(f"kwargs.{key}: {name} has no argument {key!r} (allowed: {', '.join(accepted) or 'none'})")
    return problems


# --- generic building and coercion ---------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


_INVALID = object()


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Return ``value`` as type ``tp`` or record a problem and return ``_INVALID``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str | None = None) -> Any:
        problems.append(f"{path}: {value!r} is not valid (expected {expected or _type_name(tp)})")
        return _INVALID

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is Literal:
        return value if value in args else bad()
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        scratch: list[str] = []
        for candidate in inner:
            result = _coerce(value, candidate, path, scratch)
            if result is not _INVALID:
                return result
        return bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return bad()
        element_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return bad(f"{len(element_types)} values")
        items = [_coerce(v, t, f"{path}[{i}]", problems) for i, (v, t) in enumerate(zip(value, element_types))]
        return _INVALID if any(i is _INVALID for i in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, Mapping) else bad("a mapping")
    if tp is bool:
        return value if isinstance(value, bool) else bad()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else bad()
    if tp is float:
        if isinstance(value, bool):
            return bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return bad()
        return bad()
    if tp is str:
        return value if isinstance(value, str) else bad()
    if tp is Any:
        return value
    raise TypeError(f"{path}: config type {tp!r} is not supported")


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, adding every problem (prefixed with ``path``) to ``problems``."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '(top level)'}: expected a mapping of keys, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{prefix}{key}: unknown key ({hint}allowed: {', '.join(names)})")
    before = len(problems)
    values = {
        name: _coerce(data[name], hints[name], f"{prefix}{name}", problems) for name in names if name in data
    }
    valid = {name: value for name, value in values.items() if value is not _INVALID}
    problems.extend(f"{prefix}{p}" for p in _field_problems(cls, valid))
    if len(problems) > before:  # a bad value here or inside a nested section
        return None
    try:
        return cls(**values)
    except ConfigError as error:
        problems.extend(f"{prefix}{p}" for p in error.problems)
        return None


# --- YAML and overrides ---------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"cannot read config file: {error.strerror}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def with_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Set dotted keys (``{"optimizer.lr": 1e-3}``) in a nested dict copy.

    Returns the new dict and the problems (a key that is not dotted, or a parent that is not a section).
    """
    result = _plain(dict(data))
    problems = []
    for key, value in values.items():
        if not key or any(not part for part in key.split(".")):
            problems.append(f"{key!r}: expected section.key")
            continue
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{key}: {part!r} is not a section")
                break
            node = child
        else:
            node[leaf] = _plain(value)
    return result, problems


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict copy.

    Returns the new dict and the problems with malformed overrides.
    """
    values, problems = {}, []
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {override!r}: expected section.key=value")
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            values[key] = raw
    result, value_problems = with_values(data, values)
    return result, problems + [f"override {p}" for p in value_problems]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a ``TrainConfig`` from a YAML file (or the defaults) plus ``key=value`` overrides."""
    source = str(path) if path is not None else "defaults"
    data = _read_yaml(Path(path)) if path is not None else {}
    data, override_problems = apply_overrides(data, overrides)
    problems: list[str] = list(override_problems)
    config = _build(TrainConfig, data, "", problems)
    if problems or config is None:
        raise ConfigError(problems, source)
    return config


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
            rows.append((f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("help", "")))
    return rows
