"""Search-space files: one study per YAML file in ``search_spaces/``, loaded into a frozen ``Study``.

A study names a base training config plus fixed overrides, the searched keys with their distributions,
the objective, the sampler, the scheduler, the budget and the resources of one trial. It is built by the
same typed, frozen dataclasses and field machinery as ``TrainConfig``: one load reports every problem in a
file at once (unknown keys with "did you mean", wrong types, out-of-range values, search keys the training
config does not have or values it refuses, an objective its runs do not report), naming the file and key.
Nothing here imports Ray: ``sweep.search`` turns a ``Study`` into a Tune run.

Steps in a study (``budget.max_steps``, ASHA's ``grace_period``, PBT's ``perturbation_interval``) are counted
at the base config's batch size; a trial that samples another batch size runs the same number of patches,
so trials compare at equal data seen.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sr_tune.config import TrainConfig, path_name_problem
from sr_tune.fields import ConfigError, build_values, parse_override, parse_yaml, setting, validate, with_values
from sr_tune.results import EVAL_METRICS, VGG_DISTANCES, metric_names
from sr_tune.storage import storage_problem

# What PBT may change in a running trial: numbers the engine reads afresh after a restore. Structure
# (model, optimizer type, batch size, patch size) would not fit the copied checkpoint.
PBT_MUTABLE = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "optimizer.discriminator_lr",
    "optimizer.grad_clip_norm",
    "data.augment_strength",
    "loss.pixel_weight",
    "loss.perceptual_weight",
    "loss.adversarial_weight",
)
# Every name a run can report: each study's objective is then checked against what its own runs report.
_ANY_METRIC = (*EVAL_METRICS, *(f"val_{d}" for d in VGG_DISTANCES), "patches_seen")


def _any_metric(name: str) -> str | None:
    if name in _ANY_METRIC or name.startswith("loss_"):
        return None
    close = difflib.get_close_matches(name, _ANY_METRIC, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"is not a metric runs report ({hint}allowed: {', '.join(_ANY_METRIC)}, loss_<term>)"


def _storage_location(location: str) -> str | None:
    """A local folder, or a URI of a filesystem pyarrow reaches from every node."""
    return storage_problem(location)


def _gpu_share(gpus: float) -> str | None:
    if 0 <= gpus <= 1:
        return None
    return "is not supported (allowed: 0, 1 (one GPU per DDP worker) or a share of one GPU, e.g. 0.25)"


@dataclass(frozen=True, kw_only=True)
class Distribution:
    type: Literal["loguniform", "uniform", "int", "choice"] = setting(..., "how the key is drawn")
    low: int | float | None = setting(None, "lower end of the range (loguniform: > 0)")
    high: int | float | None = setting(None, "upper end of the range")
    step: int | float | None = setting(None, "grid spacing for uniform and int (and the grid sampler)", gt=0.0)
    values: tuple[Any, ...] = setting((), "the choices (type: choice)")

    def __post_init__(self) -> None:
        validate(self, self._problems())

    def _problems(self) -> list[str]:
        if self.type == "choice":
            return [] if self.values else ["values: a choice needs a non-empty list of values"]
        problems = [f"{end}: required for type {self.type}" for end in ("low", "high") if getattr(self, end) is None]
        if self.values:
            problems.append(f"values: only for type choice (this one is {self.type})")
        if problems or self.low is None or self.high is None:
            return problems
        if self.low >= self.high:
            problems.append(f"low: {self.low!r} must be below high {self.high!r}")
        if self.type == "loguniform" and self.low <= 0:
            problems.append(f"low: {self.low!r} must be > 0 for loguniform")
        if self.type == "int":
            problems.extend(
                f"{end}: {value!r} is not an integer"
                for end, value in (("low", self.low), ("high", self.high), ("step", self.step))
                if value is not None and value != int(value)
            )
        return problems

    def extremes(self) -> tuple[Any, ...]:
        """The values every trial config must accept: each choice, or both ends of the range."""
        if self.type == "choice":
            return self.values
        return (int(self.low), int(self.high)) if self.type == "int" else (self.low, self.high)

    def optuna(self, covering: tuple[Any, ...] = ()) -> Any:
        """Optuna's distribution of this key; ``covering``: values the range is widened to hold (PBT's
        perturbations step past the bounds)."""
        import optuna

        if self.type == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.values))
        assert self.low is not None and self.high is not None
        low, high, step = min((self.low, *covering)), max((self.high, *covering)), None if covering else self.step
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(low), int(high), step=int(step or 1))
        step = step if self.type == "uniform" else None
        return optuna.distributions.FloatDistribution(low, high, log=self.type == "loguniform", step=step)

    def grid(self) -> list[Any]:
        """Every value the grid sampler visits."""
        if self.type == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.type == "loguniform" and not self.step:
            return [self.low, math.sqrt(self.low * self.high), self.high]
        step = self.step or (1 if self.type == "int" else (self.high - self.low) / 2)
        count = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values

    def edge(self, value: Any, margin: float = 0.1) -> str | None:
        """'low'/'high' when ``value`` lies within ``margin`` of the range (log scale for loguniform)."""
        if self.type == "choice" or self.low is None or self.high is None:
            return None
        scale = math.log if self.type == "loguniform" else float
        low, high, at = scale(self.low), scale(self.high), scale(value)
        if at <= low + margin * (high - low):
            return "low"
        if at >= high - margin * (high - low):
            return "high"
        return None


@dataclass(frozen=True, kw_only=True)
class Objective:
    metric: str = setting("val_psnr", "the reported metric to optimise", check=_any_metric)
    mode: Literal["max", "min"] = setting("max", "maximise or minimise it")


@dataclass(frozen=True, kw_only=True)
class Sampler:
    name: Literal["tpe", "qmc", "random", "grid"] = setting("tpe", "Optuna sampler (PBT: random)")
    seed: int = setting(0, "sampler seed", ge=0)
    startup_trials: int = setting(4, "TPE: random trials before the model-based ones", ge=0)


@dataclass(frozen=True, kw_only=True)
class Scheduler:
    name: Literal["asha", "pbt", "none"] = setting("asha", "trial scheduler")
    grace_period: int | None = setting(
        None, "ASHA: steps before a trial can be stopped (default: one evaluation interval)", ge=1
    )
    reduction_factor: float = setting(2.0, "ASHA: keep the top 1/reduction_factor at each rung", gt=1.0)
    perturbation_interval: int | None = setting(
        None, "PBT: steps between exploit/explore (default: one evaluation interval)", ge=1
    )
    quantile_fraction: float = setting(0.25, "PBT: bottom fraction copies the top fraction", gt=0.0, le=0.5)
    resample_probability: float = setting(
        0.25, "PBT: chance to resample instead of perturbing by 0.8x/1.2x", ge=0.0, le=1.0
    )
    synch: bool = setting(False, "PBT: wait for the whole population at each interval (exploits on time, slower)")


@dataclass(frozen=True, kw_only=True)
class Budget:
    num_samples: int = setting(8, "trials (the grid sampler: the grid's size)", ge=1)
    max_steps: int = setting(1000, "steps per trial at the base config's batch size", ge=1)
    max_concurrent: int = setting(0, "trials at once (0 = as many as the cluster's CPUs/GPUs fit)", ge=0)
    time_limit_s: float = setting(0.0, "wall-clock limit of the search in seconds (0 = none)", ge=0.0)
    final_steps: int = setting(
        0,
        "after the search, the best trial's values trained again from the start for this many steps (counted "
        "like max_steps) over all the CPUs the trials shared; its model is registered when it beats the best "
        "trial's (0 = none)",
        ge=0,
    )


@dataclass(frozen=True, kw_only=True)
class Resources:
    workers: int = setting(1, "Ray Train workers per trial (a Tune trial drives Ray Train workers)", ge=1)
    cpus_per_worker: float = setting(1.0, "CPUs each worker reserves", gt=0.0)
    gpus_per_worker: float = setting(
        0.0,
        "GPUs each worker reserves: 0, 1, or a share of one GPU for a one-worker trial (0.25: four trials of a "
        "small model train side by side on each GPU)",
        check=_gpu_share,
    )


@dataclass(frozen=True, kw_only=True)
class Study:
    name: str = setting(
        ..., "the study's name: the sweep's folder and MLflow run are named after it", check=path_name_problem
    )
    description: str = setting("", "what the study searches, shown with its runs")
    base: str = setting(..., "the base training config, relative to the study file")
    fixed: dict[str, Any] = setting({}, "section.key: value overrides of the base config for every trial")
    search: dict[str, Distribution] = setting(..., "section.key: {type, low, high, step | values} per searched key")
    objective: Objective = setting(Objective, "what the search optimises")
    sampler: Sampler = setting(Sampler, "how trials' values are drawn")
    scheduler: Scheduler = setting(Scheduler, "early stopping (ASHA) or population-based training")
    budget: Budget = setting(Budget, "trials, steps and time")
    resources: Resources = setting(Resources, "what one trial reserves")
    keep_checkpoints: int = setting(2, "checkpoints kept per trial, best by the objective", ge=1)
    storage: str = setting(
        "",
        "where the sweep's output lives: a folder or a URI every node reaches (s3://bucket/prefix, gs://...); "
        "default <training.output_dir>/sweeps (--storage and SR_TUNE_STORAGE win)",
        check=_storage_location,
    )
    # Set by ``load_study``, never by the file.
    path: Path = setting(Path("study.yaml"), "the study file", internal=True)
    text: str = setting("", "the file's contents, logged to MLflow as written", internal=True)
    overrides: tuple[str, ...] = setting((), "the command line's key=value overrides of the file", internal=True)
    base_data: dict[str, Any] = setting(
        {}, "the base config's contents (trials on other nodes read no file)", internal=True
    )

    def __post_init__(self) -> None:
        validate(self, _cross_problems(vars(self)))

    @property
    def base_path(self) -> Path:
        return self.path.parent / self.base

    @functools.cached_property
    def base_config(self) -> TrainConfig:
        """The base config with the fixed overrides, as every trial starts from it: built once."""
        return self.trial_config({})

    @functools.cached_property
    def base_batch_size(self) -> int:
        """The base config's batch size (with ``fixed``): what the study's step counts are counted in."""
        return self.base_config.data.batch_size

    def trial_config(
        self, sampled: Mapping[str, Any], *, steps: int | None = None, workers: int | None = None
    ) -> TrainConfig:
        """The base config with the fixed overrides, the sampled values, and the trial's length (``steps``,
        default ``budget.max_steps``) and evaluation interval rescaled to its batch size (same patches seen as the
        base batch size), on ``workers`` (default ``resources.workers``)."""
        budget = self.budget if steps is None else dataclasses.replace(self.budget, max_steps=steps)
        resources = self.resources if workers is None else dataclasses.replace(self.resources, workers=workers)
        return _trial_config(self.base_data, self.fixed, sampled, budget, resources, str(self.path))

    def patches(self, steps: int) -> int:
        """Patches seen in ``steps`` steps at the base batch size over all of a trial's workers."""
        return steps * self.base_batch_size * self.resources.workers

    def stopped_early(self, patches_seen: int, *, failed: bool) -> bool:
        """A trial that ended without failing after some reports, short of the budget: the scheduler stopped it."""
        return not failed and 0 < patches_seen < self.patches(self.budget.max_steps)

    def eval_interval_steps(self) -> int:
        return self.base_config.training.eval_interval


def _config(data: Mapping[str, Any], values: Mapping[str, Any], source: str) -> TrainConfig:
    merged, problems = with_values(data, values)
    if problems:
        raise ConfigError(problems, source)
    return TrainConfig.from_dict(merged, source)


def _base_batch(base_data: Mapping[str, Any], fixed: Mapping[str, Any], source: str) -> int:
    return _config(base_data, {k: v for k, v in fixed.items() if k == "data.batch_size"}, source).data.batch_size


def _trial_config(
    base_data: Mapping[str, Any],
    fixed: Mapping[str, Any],
    sampled: Mapping[str, Any],
    budget: Budget,
    resources: Resources,
    source: str,
) -> TrainConfig:
    config = _config(base_data, {**fixed, **sampled}, source)
    base_batch, batch = _base_batch(base_data, fixed, source), config.data.batch_size
    # Rounded up, so every trial reaches each budget point.
    steps, interval = (-(-count * base_batch // batch) for count in (budget.max_steps, config.training.eval_interval))
    return _config(
        config.to_dict(),
        {
            "training.steps": steps,
            "training.eval_interval": interval,
            "distributed.num_workers": resources.workers,
            "distributed.cpus_per_worker": resources.cpus_per_worker,
            "distributed.use_gpu": resources.gpus_per_worker > 0,
        },
        source,
    )


# Training-config keys a sweep sets from the study's own keys: in ``fixed`` or ``search`` they would be ignored.
SWEEP_OWNED = {
    "distributed.num_workers": "resources.workers",
    "distributed.cpus_per_worker": "resources.cpus_per_worker",
    "distributed.use_gpu": "resources.gpus_per_worker",
    "distributed.keep_checkpoints": "keep_checkpoints",
    "distributed.storage_path": "storage (or --storage)",
}


def _cross_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems between the study's parts, on whatever parts are valid (a partial study reports these in the
    same round as its own bad keys): base + fixed must make a config, each searched key must accept each of
    its extremes, the objective must be a metric those runs report, and PBT's rules."""
    problems: list[str] = []
    base_data, fixed, search = values.get("base_data"), values.get("fixed", {}), values.get("search") or {}
    budget, resources = values.get("budget", Budget()), values.get("resources", Resources())
    sampler, scheduler = values.get("sampler", Sampler()), values.get("scheduler", Scheduler())
    objective = values.get("objective", Objective())
    source = str(values.get("path", "study"))
    problems.extend(
        f"{part}.{key}: a sweep sets it from the study's {SWEEP_OWNED[key]}; set that instead"
        for part, keys in (("fixed", fixed or {}), ("search", search))
        for key in keys
        if key in SWEEP_OWNED
    )
    if base_data is not None and fixed is not None:
        try:
            configs = [("base", _trial_config(base_data, fixed, {}, budget, resources, source))]
        except ConfigError as error:
            configs = []
            problems.extend(f"fixed (on base {values.get('base')}): {p}" for p in error.problems)
        for key, dist in search.items() if configs else ():
            for value in dist.extremes():
                try:
                    config = _trial_config(base_data, fixed, {key: value}, budget, resources, source)
                except ConfigError as error:
                    problems.extend(f"search.{key} = {value!r}: {p}" for p in error.problems)
                    break
                configs.append((f"search.{key} = {value!r}", config))
        if configs and budget.final_steps:
            final_budget = dataclasses.replace(budget, max_steps=budget.final_steps)
            try:
                _trial_config(base_data, fixed, {}, final_budget, resources, source)
            except ConfigError as error:
                problems.extend(f"budget.final_steps = {budget.final_steps}: {p}" for p in error.problems)
        for where, config in configs:
            if objective.metric not in (*metric_names(config.loss), "patches_seen"):
                problems.append(
                    f"objective.metric: {objective.metric!r} is not reported by the runs of this study ({where}: "
                    f"loss.adversarial = {config.loss.adversarial!r}); they report "
                    f"{', '.join(metric_names(config.loss))}"
                )
                break
    if 0 < resources.gpus_per_worker < 1 and resources.workers > 1:
        problems.append(
            f"resources.gpus_per_worker: a share of a GPU ({resources.gpus_per_worker:g}) is for one-worker trials "
            f"(the DDP workers of one trial each need a GPU of their own); set resources.workers=1 or "
            f"resources.gpus_per_worker=1"
        )
    grace = scheduler.grace_period
    if scheduler.name == "asha" and grace is not None and grace > budget.max_steps:
        problems.append(
            f"scheduler.grace_period: {grace} steps is past budget.max_steps {budget.max_steps}: ASHA's first rung "
            f"would never come; lower it (e.g. scheduler.grace_period={budget.max_steps // 2})"
        )
    if scheduler.name == "pbt":
        problems.extend(
            f"search.{key}: PBT can only change {', '.join(PBT_MUTABLE)} in a running trial"
            for key in search
            if key not in PBT_MUTABLE
        )
        if sampler.name != "random":
            problems.append(
                "sampler.name: PBT draws its start points at random (Ray refuses PBT with a search algorithm); "
                "set sampler.name: random"
            )
    if "search" in values and not search:
        problems.append("search: name at least one key to search")
    return problems


_SECTIONS = {
    "objective": Objective,
    "sampler": Sampler,
    "scheduler": Scheduler,
    "budget": Budget,
    "resources": Resources,
}


def _valid_part(section: type, raw: Any) -> Any:
    """``section`` built from the keys of ``raw`` that are valid on their own (None when that fails too)."""
    valid = build_values(section, raw, "", []) if isinstance(raw, Mapping) else None
    try:
        return section(**valid) if valid is not None else None
    except ConfigError:
        return None


# The study's own keys an override may set; any other ``section.key`` is a training-config key of every trial.
_STUDY_KEYS = ("name", "description", "keep_checkpoints", "storage")
_CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


LOCAL_RESOURCES = "local"


def fit_to_this_machine(asked: Any) -> tuple[dict[str, Any], str | None]:
    """What ``resources=local`` sets: the study's trial fitted to the machine the sweep starts on. Its workers
    (at most one per CPU) reserve one CPU each, so that trials run side by side, and keep the study's GPUs
    only where the machine has one for every worker; otherwise they train on the CPU (the second value:
    the ``training.device`` to fix, or None). Values the study got wrong are kept, for validation to name."""
    import os

    import torch

    asked = asked if isinstance(asked, Mapping) else {}
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    workers, gpus_per_worker = asked.get("workers", 1), asked.get("gpus_per_worker", 0.0)
    if not isinstance(workers, int) or not isinstance(gpus_per_worker, int | float):
        return {}, None
    workers = min(workers, cpus)
    on_gpus = bool(gpus_per_worker) and workers * gpus_per_worker <= gpus
    fitted = {
        "resources.workers": workers,
        "resources.cpus_per_worker": 1,
        "resources.gpus_per_worker": gpus_per_worker if on_gpus else 0,
    }
    return fitted, "cpu" if gpus_per_worker and not on_gpus else None


def with_overrides(raw: Any, overrides: Sequence[str]) -> tuple[Any, list[str]]:
    """A study's raw mapping with ``key=value`` overrides (values parsed as YAML): the study's own keys
    (``budget.num_samples=4``, ``resources.cpus_per_worker=1``, ``keep_checkpoints=1``) set in place, a
    training-config key (``training.device=cpu``) added to ``fixed``, ``resources=local`` as
    ``fit_to_this_machine`` says. A searched key cannot be overridden."""
    if not overrides:
        return raw, []
    data = dict(raw) if isinstance(raw, Mapping) else {}
    study_values, fixed, problems = {}, dict(data.get("fixed") or {}), []
    searched = data.get("search") if isinstance(data.get("search"), Mapping) else {}
    for override in overrides:
        parsed = parse_override(override)
        key, value = parsed or ("", None)
        section = key.split(".", 1)[0]
        if parsed is None:
            problems.append(f"override {override!r}: expected key=value (e.g. budget.num_samples=4)")
        elif key == "resources" and value == LOCAL_RESOURCES:
            fitted, device = fit_to_this_machine(data.get("resources"))
            study_values.update(fitted)
            if device:
                fixed["training.device"] = device
        elif key in _STUDY_KEYS or (section in _SECTIONS and "." in key):
            study_values[key] = value
        elif section in _CONFIG_SECTIONS and "." in key:
            if key in searched:
                problems.append(f"override {override!r}: {key} is searched by the study; change its search range")
            fixed[key] = value
        else:
            sections = ", ".join([*_SECTIONS, *_STUDY_KEYS, *(f"{name}.*" for name in _CONFIG_SECTIONS)])
            problems.append(f"override {override!r}: {key!r} is neither a study key nor a config key ({sections})")
    data, value_problems = with_values(data, study_values)
    data["fixed"] = fixed
    return data, problems + [f"override {problem}" for problem in value_problems]


def load_study(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    base_checks: Callable[[TrainConfig], list[str]] | None = None,
    extra_problems: Sequence[str] = (),
) -> Study:
    """Read and validate a study file with command-line ``overrides`` (``with_overrides``); every problem is
    reported at once, naming the file and key, with ``extra_problems`` (the command line's) and what
    ``base_checks`` finds in the base config (its data, where the command runs) when it builds."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"cannot read the study: {error}"], str(path)) from None
    raw, override_problems = with_overrides(parse_yaml(text, str(path)), overrides)
    problems: list[str] = [*extra_problems, *override_problems]
    values = build_values(Study, {} if raw is None else raw, "", problems)
    if values is None:
        raise ConfigError(problems, str(path))
    values.update(path=path, text=text, overrides=tuple(overrides))
    if "base" in values:
        base = path.parent / values["base"]
        try:
            base_data = parse_yaml(base.read_text(), str(base))
        except OSError as error:
            problems.append(f"base: {values['base']!r} cannot be read (resolved to {base}): {error.strerror}")
        except ConfigError as error:
            problems.extend(f"base: {base}: {problem}" for problem in error.problems)
        else:
            if isinstance(base_data, dict):
                values["base_data"] = base_data
            else:
                problems.append(f"base: {base} is not a mapping of config sections")
    # A section with a bad key still takes part in the checks between sections, with its valid keys.
    partial = {name: _valid_part(section, raw.get(name)) for name, section in _SECTIONS.items() if name not in values}
    problems.extend(_cross_problems({**values, **{k: v for k, v in partial.items() if v is not None}}))
    if base_checks is not None and "base_data" in values:
        try:
            base = _config(values["base_data"], values.get("fixed") or {}, str(path))
        except ConfigError:
            pass  # already reported
        else:
            problems.extend(base_checks(base))
    if problems:
        labelled = [_label_study_override(problem, overrides) for problem in dict.fromkeys(problems)]
        raise ConfigError(labelled, str(path) + (" and its command-line overrides" if overrides else ""))
    return Study(**values)


def _label_study_override(problem: str, overrides: Sequence[str]) -> str:
    """``problem`` with the override that set its key (``budget.num_samples``, or ``fixed.<key>`` for a
    training-config key), so that it is not blamed on the file."""
    for override in overrides:
        key = override.partition("=")[0]
        if problem.startswith((f"{key}:", f"fixed.{key}:", "fixed (on base")) and key in problem:
            return f"{problem} (from the override {override!r})"
    return problem
