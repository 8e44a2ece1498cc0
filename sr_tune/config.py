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
import functools
import inspect
import operator
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sr_tune.credentials import credential_problem, redact
from sr_tune.models import get_builder, list_models
from sr_tune.models.registry import out_of_range, size_problem


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` lists each one as ``"key: what is wrong"``."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = [redact(problem) for problem in problems]  # a refused secret is not echoed either
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


def setting(
    default: Any,
    help: str,
    check: Callable[[Any], str | None] | None = None,
    *,
    internal: bool = False,
    **bounds: float,
) -> Any:
    """A config field with its help text, optional bounds (``ge``, ``gt``, ``le``, ``lt``) and an optional
    ``check(value) -> problem or None`` for rules a type cannot say. ``...`` as the default: a required key.
    ``internal``: set by a loader (e.g. a study's file path), never a key of the file."""
    metadata = {"help": help, "check": check, "internal": internal, **bounds}
    if default is ...:
        return field(metadata=metadata)
    if isinstance(default, type):  # a section: built on use, after this module has loaded
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """The problem of ``value`` in field ``f``: a failed ``check`` or a number out of its bounds."""
    check = f.metadata.get("check")
    if check is not None and (problem := check(value)):
        return f"{f.name}: {value!r} {problem}"
    bounds = {k: v for k, v in f.metadata.items() if k in _BOUND_TEXT}
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    within = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
    if all(within[kind](value, bound) for kind, bound in bounds.items()):
        return None
    allowed = " and ".join(f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items())
    return f"{f.name}: {value!r} is out of range (allowed: {allowed})"


def _field_problems(cls: type, values: Mapping[str, Any]) -> list[str]:
    """Per-field problems of section ``cls``: out-of-range numbers and failed ``check``s."""
    problems = (_field_problem(f, values[f.name]) for f in dataclasses.fields(cls) if f.name in values)
    return [problem for problem in problems if problem]


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field name: allowed values} for the ``Literal`` fields of section ``cls``."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(tp) for name, tp in hints.items() if typing.get_origin(tp) is Literal}


def validate(instance: Any, extra: Sequence[str] = ()) -> None:
    """Raise one ``ConfigError`` for the section's per-field problems and its cross-field ``extra`` ones. A
    section built in code is held to the same names as one read from a file (``Literal`` fields)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    problems = [
        f"{name}: {values[name]!r} is not valid (expected one of {', '.join(map(repr, allowed))})"
        for name, allowed in _literal_fields(type(instance)).items()
        if values[name] not in allowed
    ]
    problems += _field_problems(type(instance), values) + list(extra)
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
        if not problems and self.name in list_models() and self.scale in (2, 3, 4) and "in_channels" not in self.kwargs:
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


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    pixel: Literal["mse", "l1", "charbonnier"] = setting("mse", "pixel loss between SR and HR")
    pixel_weight: float = setting(1.0, "weight of the pixel loss (0 = off)", ge=0.0)
    charbonnier_eps: float = setting(1e-3, "epsilon of the Charbonnier loss sqrt(d^2 + eps^2)", gt=0.0)
    perceptual: Literal["none", "vgg22", "vgg54"] = setting(
        "none", "VGG19 feature loss: relu2_2 (vgg22) or relu5_4 (vgg54), ImageNet weights"
    )
    perceptual_weight: float = setting(1.0, "weight of the perceptual loss", ge=0.0)
    adversarial: Literal["none", "bce", "relativistic"] = setting(
        "none", "GAN loss with an SRGAN discriminator: BCE-with-logits, or relativistic average BCE"
    )
    adversarial_weight: float = setting(1e-3, "weight of the generator's adversarial loss", ge=0.0)

    def __post_init__(self) -> None:
        weights = (
            self.pixel_weight,
            self.perceptual_weight if self.perceptual != "none" else 0.0,
            self.adversarial_weight if self.adversarial != "none" else 0.0,
        )
        validate(self, [] if any(w > 0 for w in weights) else ["pixel_weight: every loss term has weight 0"])


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


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = setting(ModelConfig, "the network")
    data: DataConfig = setting(DataConfig, "images, patches and degradation")
    loss: LossConfig = setting(LossConfig, "loss terms and weights")
    optimizer: OptimizerConfig = setting(OptimizerConfig, "optimizer and its settings")
    training: TrainingConfig = setting(TrainingConfig, "steps, evaluation, seed, device")
    distributed: DistributedConfig = setting(DistributedConfig, "Ray Train workers and storage")
    tracking: TrackingConfig = setting(TrackingConfig, "MLflow")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def in_channels(self) -> int:
        return 1 if self.data.color == "y" else 3

    @property
    def run_name(self) -> str:
        """Deterministic (no timestamp), so a rerun with the same storage path finds and resumes the run."""
        return self.tracking.run_name or f"{self.model.name}_x{self.model.scale}"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that ``TrainConfig.from_dict`` reads back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
        """Build and validate from a nested mapping; raises one ``ConfigError`` listing every problem."""
        problems: list[str] = []
        config = _build(cls, expand_home(data), "", problems)
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
            coerced = _coerce(value, hints[key], f"kwargs.{key}", problems)
            if coerced is not _INVALID:
                problems += [f"kwargs.{problem}" for problem in out_of_range(name, {key: coerced})]
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
        built = _build(tp, value, path, problems)
        return _INVALID if built is None else built
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        return bad(f"{'did you mean ' + repr(close[0]) + '? ' if close else ''}{_type_name(tp)}")
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
        if not isinstance(value, Mapping):
            return bad("a mapping")
        if args[1] is Any:
            return dict(value)
        # The valid items only (each bad one is a recorded problem): a caller checking relations between
        # sections still sees the good entries of a mapping that has a bad one.
        items = {key: _coerce(item, args[1], f"{path}.{key}", problems) for key, item in value.items()}
        return {key: item for key, item in items.items() if item is not _INVALID}
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


def _required(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build_values(cls: type, data: Any, path: str, problems: list[str]) -> dict[str, Any] | None:
    """The fields of dataclass ``cls`` that ``data`` sets validly, each coerced (sections built); every
    problem (prefixed with ``path``) goes to ``problems``. Fields marked ``internal`` in their metadata are
    set by loaders, never by a file: they are not offered as keys. None when ``data`` is not a mapping.

    Callers that check relations between sections (a study's objective against its base config) use the
    valid part to report those problems in the same round as the rest."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '(top level)'}: expected a mapping of keys, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{prefix}{key}: unknown key ({hint}allowed: {', '.join(names)})")
    problems.extend(f"{prefix}{name}: required" for name in names if _required(cls, name) and name not in data)
    valid = {}
    for f in dataclasses.fields(cls):
        if f.name not in names or f.name not in data:
            continue
        value = _coerce(data[f.name], hints[f.name], f"{prefix}{f.name}", problems)
        problem = None if value is _INVALID else _field_problem(f, value)
        if problem:
            problems.append(f"{prefix}{problem}")
        elif value is not _INVALID:
            valid[f.name] = value
    return valid


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, adding every problem (prefixed with ``path``) to ``problems``."""
    before = len(problems)
    values = build_values(cls, data, path, problems)
    if values is None or len(problems) > before:  # a bad value here or inside a nested section
        return None
    try:
        return cls(**values)
    except ConfigError as error:
        prefix = f"{path}." if path else ""
        problems.extend(f"{prefix}{p}" for p in error.problems)
        return None


# --- YAML and overrides ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in first_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_lines[key]})", key_node.start_mark
            )
        first_lines.setdefault(key, key_node.start_mark.line + 1)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str) -> Any:
    """YAML ``text`` of file ``source``; a syntax error or a duplicate key raises ``ConfigError`` with its line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({error.context})" if error.context else ""
        raise ConfigError([f"not valid YAML: {where}{error.problem}{context}"], source) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], source) from None


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


def parse_override(override: str) -> tuple[str, Any] | None:
    """``key=value`` as (key, value parsed as YAML, else the text); None without a key or ``=``."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        return None
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


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
    config = _build(TrainConfig, data, "", problems)
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
            rows.append((f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("help", "")))
    return rows
