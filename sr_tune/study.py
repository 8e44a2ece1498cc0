"""Search-space files: one study per YAML file in ``search_spaces/``, loaded into a frozen ``Study``.

A study names a base training config plus fixed overrides, the searched keys with their distributions,
the objective, the sampler, the scheduler, the budget and the resources of one trial. Every problem in
a file (unknown keys, bad ranges, search keys the training config does not have, values it refuses) is
reported in one ``ConfigError`` naming the file. Nothing here imports Ray: ``sweep.py`` turns a ``Study``
into a Tune run.

Steps in a study (``budget.max_steps``, ASHA's ``grace_period``, PBT's ``perturbation_interval``) are counted
at the base config's batch size; a trial that samples another batch size runs the same number of patches,
so trials compare at equal data seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sr_tune.config import ConfigError, TrainConfig, with_values

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SAMPLERS = ("tpe", "qmc", "random", "grid")
SCHEDULERS = ("asha", "pbt", "none")
# Metrics each evaluation reports (``EvalResult.metrics``); VGG distances only in runs with a perceptual loss.
OBJECTIVES = ("val_psnr", "val_ssim", "psnr_gain", "loss", "val_vgg22", "val_vgg54")
# What PBT may change in a running trial: numbers the engine reads afresh after a restore. Structure
# (model, optimizer type, batch size, patch size) would not fit the copied checkpoint.
PBT_MUTABLE = ("optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.discriminator_lr",
               "optimizer.grad_clip_norm", "data.augment_strength", "loss.pixel_weight",
               "loss.perceptual_weight", "loss.adversarial_weight")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Distribution:
    key: str  # dotted training-config key, e.g. "optimizer.lr"
    kind: str  # one of DISTRIBUTIONS
    low: float | None = None
    high: float | None = None
    step: float | None = None  # grid spacing for uniform/int (and the grid sampler)
    values: tuple[Any, ...] = ()  # choice

    def grid(self) -> list[Any]:
        """Every value the grid sampler visits."""
        if self.kind == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.kind == "loguniform" and not self.step:
            return [self.low, math.sqrt(self.low * self.high), self.high]
        step = self.step or (1 if self.kind == "int" else (self.high - self.low) / 2)
        count = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else values

    def edge(self, value: Any, margin: float = 0.1) -> str | None:
        """'low'/'high' when ``value`` lies within ``margin`` of the range (log scale for loguniform)."""
        if self.kind == "choice" or self.low is None or self.high is None:
            return None
        scale = math.log if self.kind == "loguniform" else float
        low, high, at = scale(self.low), scale(self.high), scale(value)
        if at <= low + margin * (high - low):
            return "low"
        if at >= high - margin * (high - low):
            return "high"
        return None


@dataclass(frozen=True, kw_only=True)
class Objective:
    metric: str = "val_psnr"
    mode: str = "max"


@dataclass(frozen=True, kw_only=True)
class Sampler:
    name: str = "tpe"
    seed: int = 0
    startup_trials: int = 4  # TPE: random trials before the model-based ones


@dataclass(frozen=True, kw_only=True)
class Scheduler:
    name: str = "asha"
    grace_period: int = 0  # ASHA: steps before a trial can be stopped (0 = one evaluation interval)
    reduction_factor: float = 2.0  # ASHA: keep the top 1/reduction_factor at each rung
    perturbation_interval: int = 0  # PBT: steps between exploit/explore (0 = one evaluation interval)
    quantile_fraction: float = 0.25  # PBT: bottom fraction copies the top fraction
    resample_probability: float = 0.25  # PBT: chance to resample instead of perturbing by 0.8x/1.2x
    synch: bool = False  # PBT: wait for the whole population at each interval (exploits on time, slower)


@dataclass(frozen=True, kw_only=True)
class Budget:
    num_samples: int = 8
    max_steps: int = 1000  # at the base config's batch size
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs/GPUs fit
    time_limit_s: float = 0.0  # 0 = none


@dataclass(frozen=True, kw_only=True)
class Resources:
    workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Study:
    name: str
    description: str
    path: Path  # the study file
    text: str  # its contents, logged to MLflow as written
    base: Path  # the base training config
    base_data: Mapping[str, Any]  # its contents, read once: trials on other cluster nodes need no file
    fixed: Mapping[str, Any]
    search: tuple[Distribution, ...]
    objective: Objective = field(default_factory=Objective)
    sampler: Sampler = field(default_factory=Sampler)
    scheduler: Scheduler = field(default_factory=Scheduler)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    keep_checkpoints: int = 2  # per trial, best by the objective

    def base_config(self) -> TrainConfig:
        return self.trial_config({})

    def trial_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """The base config with the fixed overrides, the sampled values, and the trial's length and
        evaluation interval rescaled to its batch size (same patches seen as the base batch size)."""
        data, problems = with_values(self.base_data, {**self.fixed, **sampled})
        config = _build_config(data, problems, str(self.path))
        base_batch = _base_batch(self)
        batch = config.data.batch_size  # rounded up, so every trial reaches each budget point
        steps, interval = (-(-count * base_batch // batch) for count in (self.budget.max_steps, config.training.eval_interval))
        scaled = {"training.steps": steps, "training.eval_interval": interval,
                  "distributed.num_workers": self.resources.workers,
                  "distributed.cpus_per_worker": self.resources.cpus_per_worker,
                  "distributed.use_gpu": self.resources.gpus_per_worker > 0}  # fmt: skip
        data, problems = with_values(data, scaled)
        return _build_config(data, problems, str(self.path))

    def patches(self, steps: int) -> int:
        """Patches seen in ``steps`` steps at the base batch size over all of a trial's workers."""
        return steps * _base_batch(self) * self.resources.workers

    def eval_interval_steps(self) -> int:
        return self.base_config().training.eval_interval


def _base_batch(study: Study) -> int:
    data, problems = with_values(study.base_data, {k: v for k, v in study.fixed.items() if k == "data.batch_size"})
    return _build_config(data, problems, str(study.path)).data.batch_size


def _build_config(data: Mapping[str, Any], problems: list[str], source: str) -> TrainConfig:
    if problems:
        raise ConfigError(problems, source)
    return TrainConfig.from_dict(data, source)


_SECTIONS = {"objective": Objective, "sampler": Sampler, "scheduler": Scheduler, "budget": Budget,
             "resources": Resources}  # fmt: skip
_TOP_KEYS = ("name", "description", "base", "fixed", "search", "keep_checkpoints", *_SECTIONS)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; every problem is reported at once, naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError([f"cannot read the study: {error}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping"], str(path))
    problems = [f"{key}: unknown key (allowed: {', '.join(_TOP_KEYS)})" for key in raw if key not in _TOP_KEYS]
    for key in ("name", "base", "search"):
        if key not in raw:
            problems.append(f"{key}: required")

    sections = {name: _section(cls, raw.get(name) or {}, name, problems) for name, cls in _SECTIONS.items()}
    search = tuple(_distribution(key, spec, problems) for key, spec in (raw.get("search") or {}).items())
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        problems.append(f"fixed: expected a mapping of section.key: value, got {fixed!r}")
        fixed = {}
    base = path.parent / str(raw.get("base", ""))
    if "base" in raw and not base.is_file():
        problems.append(f"base: {raw['base']!r} is not a file (resolved to {base})")
    base_data: Any = {}
    if "base" in raw and base.is_file():
        try:
            base_data = yaml.safe_load(base.read_text()) or {}
        except yaml.YAMLError as error:
            problems.append(f"base: {base} is not valid YAML: {error}")
        if not isinstance(base_data, dict):
            problems.append(f"base: {base} is not a mapping of config sections")
    keep = raw.get("keep_checkpoints", 2)
    if not isinstance(keep, int) or keep < 1:
        problems.append(f"keep_checkpoints: {keep!r} must be an integer >= 1")
    if problems:
        raise ConfigError(problems, str(path))

    study = Study(name=str(raw["name"]), description=str(raw.get("description", "")).strip(), path=path,
                  text=text, base=base, base_data=base_data, fixed=fixed, search=search, keep_checkpoints=keep,
                  **{k: v for k, v in sections.items() if v is not None})  # fmt: skip
    problems = _study_problems(study)
    if problems:
        raise ConfigError(problems, str(path))
    return study


def _section(cls: type, values: Any, name: str, problems: list[str]) -> Any:
    if not isinstance(values, dict):
        problems.append(f"{name}: expected a mapping, got {values!r}")
        return None
    known = cls.__dataclass_fields__
    unknown = [key for key in values if key not in known]
    problems.extend(f"{name}.{key}: unknown key (allowed: {', '.join(known)})" for key in unknown)
    if unknown:
        return None
    for key, value in values.items():
        expected = type(known[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            problems.append(f"{name}.{key}: {value!r} is not a {expected.__name__}")
            return None
    return cls(**values)


def _distribution(key: str, spec: Any, problems: list[str]) -> Distribution:
    where = f"search.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
        problems.append(f"{where}: expected {{type: {' | '.join(DISTRIBUTIONS)}, ...}}, got {spec!r}")
        return Distribution(key=key, kind="choice", values=(None,))
    kind = spec["type"]
    allowed = ("type", "values") if kind == "choice" else ("type", "low", "high", "step")
    problems.extend(f"{where}.{extra}: unknown key (allowed: {', '.join(allowed)})" for extra in spec
                    if extra not in allowed)  # fmt: skip
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.values: expected a non-empty list, got {values!r}")
            values = [None]
        return Distribution(key=key, kind=kind, values=tuple(values))
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    number = int if kind == "int" else (int, float)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if (value is not None or name != "step") and (not isinstance(value, number) or isinstance(value, bool)):
            problems.append(f"{where}.{name}: {value!r} is not {'an integer' if kind == 'int' else 'a number'}")
            return Distribution(key=key, kind=kind, low=1.0, high=2.0)
    if low >= high:
        problems.append(f"{where}: low {low!r} must be below high {high!r}")
    if kind == "loguniform" and low <= 0:
        problems.append(f"{where}.low: {low!r} must be > 0 for loguniform")
    if step is not None and step <= 0:
        problems.append(f"{where}.step: {step!r} must be > 0")
    return Distribution(key=key, kind=kind, low=low, high=high, step=step)


def _study_problems(study: Study) -> list[str]:
    """Cross-checks against the training config: base + fixed must load, and each searched key must
    exist there and accept both ends of its range (or every choice)."""
    problems = []
    try:
        study.base_config()
    except ConfigError as error:
        return [f"base {study.base} with fixed overrides: {p}" for p in error.problems]
    for dist in study.search:
        for value in dist.values if dist.kind == "choice" else (dist.low, dist.high):
            try:
                study.trial_config({dist.key: value})
            except ConfigError as error:
                problems.extend(f"search.{dist.key} = {value!r}: {p}" for p in error.problems)
                break
    if study.objective.metric not in OBJECTIVES:
        problems.append(f"objective.metric: {study.objective.metric!r} is not reported (allowed: {', '.join(OBJECTIVES)})")
    if study.objective.mode not in ("max", "min"):
        problems.append(f"objective.mode: {study.objective.mode!r} must be max or min")
    if study.sampler.name not in SAMPLERS:
        problems.append(f"sampler.name: {study.sampler.name!r} (allowed: {', '.join(SAMPLERS)})")
    if study.scheduler.name not in SCHEDULERS:
        problems.append(f"scheduler.name: {study.scheduler.name!r} (allowed: {', '.join(SCHEDULERS)})")
    if study.scheduler.name == "pbt":
        problems.extend(f"search.{d.key}: PBT can only change {', '.join(PBT_MUTABLE)} in a running trial"
                        for d in study.search if d.key not in PBT_MUTABLE)  # fmt: skip
        if study.sampler.name != "random":
            problems.append("sampler.name: PBT draws its start points at random (Ray refuses PBT with a search "
                            "algorithm); set sampler.name: random")  # fmt: skip
    budget, resources = study.budget, study.resources
    if budget.num_samples < 1:
        problems.append(f"budget.num_samples: {budget.num_samples} must be >= 1")
    if budget.max_steps < 1:
        problems.append(f"budget.max_steps: {budget.max_steps} must be >= 1")
    if budget.max_concurrent < 0 or budget.time_limit_s < 0:
        problems.append("budget: max_concurrent and time_limit_s must be >= 0")
    if resources.workers < 1:
        problems.append(f"resources.workers: {resources.workers} must be >= 1 (a Tune trial drives Ray Train workers)")
    if resources.cpus_per_worker <= 0:
        problems.append(f"resources.cpus_per_worker: {resources.cpus_per_worker} must be > 0")
    if resources.gpus_per_worker not in (0, 1):
        problems.append(f"resources.gpus_per_worker: {resources.gpus_per_worker} must be 0 or 1 (one GPU per DDP worker)")
    if study.scheduler.reduction_factor <= 1:
        problems.append(f"scheduler.reduction_factor: {study.scheduler.reduction_factor} must be > 1")
    if not 0 < study.scheduler.quantile_fraction <= 0.5:
        problems.append(f"scheduler.quantile_fraction: {study.scheduler.quantile_fraction} must be in (0, 0.5]")
    return problems
