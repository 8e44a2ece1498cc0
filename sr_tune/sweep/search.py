"""A study as Ray Tune and Optuna take it: the searcher and scheduler, the trials' names, folders and
resources. Nothing here needs a running Ray except ``max_concurrent_trials``, which asks the cluster."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sr_tune.errors import InputError
from sr_tune.local_ray import trial_number
from sr_tune.study import Distribution, Study

DRIVER_CPUS = 0.05  # a trial's driver only waits on its workers; they get the rest of the trial's CPUs


def runs_in_trial(study: Study) -> bool:
    """A trial of one CPU worker, or of one worker with a share of a GPU, trains in the trial's own process:
    Ray Train would start a controller, a worker and their helpers (five more processes, two of them importing
    torch) for no parallelism."""
    return study.resources.workers == 1 and study.resources.gpus_per_worker < 1


def trial_resources(study: Study) -> dict[str, float]:
    """What Tune reserves for a trial. A share of a GPU is Ray's fractional GPU resource: Tune places as many
    such trials on a GPU as their shares fit, and each trial's process sees that GPU alone (Ray sets its
    ``CUDA_VISIBLE_DEVICES``). Ray does not divide the GPU's memory: the trials must fit in it together."""
    if runs_in_trial(study):
        gpus = study.resources.gpus_per_worker
        return {"CPU": study.resources.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return {"CPU": DRIVER_CPUS}  # the driver only waits on its Train workers, which get the rest


def trial_dirname(trial: Any) -> str:
    """The trial's folder: its id alone (Tune's default adds every param and a timestamp)."""
    return f"trial_{trial.trial_id}"


def trial_namer(study: Study) -> Callable[[Any], str]:
    """Tune's display name for a trial, ``t03``: its number in the sweep, which leads Tune's experiment tag
    (counted from 1 by the search algorithm's generator, from 0 by PBT's variant generator) and survives a
    resumed sweep."""
    first = 0 if study.scheduler.name == "pbt" else 1

    def name(trial: Any) -> str:
        return f"t{trial_number(trial) + 1 - first:02d}"

    return name


def _tune_domain(dist: Distribution) -> Any:
    if dist.type == "choice":
        return tune.choice(list(dist.values))
    if dist.type == "int":
        return tune.qrandint(int(dist.low), int(dist.high), int(dist.step or 1))
    if dist.type == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.quniform(dist.low, dist.high, dist.step) if dist.step else tune.uniform(dist.low, dist.high)


def search_setup(study: Study, optuna_url: str | None, max_concurrent: int) -> tuple[Any, Any, dict[str, Any], int]:
    """(search algorithm, scheduler, param space, num_samples) for the study; the Optuna study stored at
    ``optuna_url`` (None: in memory, saved with Tune's searcher state)."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objective, settings, interval = study.objective, study.scheduler, study.eval_interval_steps()
    if settings.name == "pbt":
        space = {key: _tune_domain(dist) for key, dist in study.search.items()}
        scheduler = PopulationBasedTraining(
            time_attr="patches_seen",
            perturbation_interval=study.patches(settings.perturbation_interval or interval),
            hyperparam_mutations=space,
            quantile_fraction=settings.quantile_fraction,
            resample_probability=settings.resample_probability,
            synch=settings.synch,
        )
        return None, scheduler, space, num_trials(study)

    seed = study.sampler.seed
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=study.sampler.startup_trials
        ),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, scramble=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler({k: d.grid() for k, d in study.search.items()}, seed=seed),
    }
    searcher = OptunaSearch(
        space={key: dist.optuna() for key, dist in study.search.items()},
        metric=objective.metric,
        mode=objective.mode,
        sampler=samplers[study.sampler.name](),
        study_name=study.name,
        storage=_optuna_storage(optuna_url) if optuna_url else None,
    )
    scheduler = FIFOScheduler()
    if settings.name == "asha":
        # max_t one patch past the budget: trials end by themselves at the budget (killing one there would cut
        # its Train run short); ASHA only stops trials early.
        scheduler = ASHAScheduler(
            time_attr="patches_seen",
            max_t=study.patches(study.budget.max_steps) + 1,
            # Without a grace period, the first evaluation (the budget's end, should it come first).
            grace_period=study.patches(settings.grace_period or min(interval, study.budget.max_steps)),
            reduction_factor=settings.reduction_factor,
        )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), scheduler, {}, num_trials(study)


def num_trials(study: Study) -> int:
    """How many trials the sweep runs: every point of a grid, else the budget's ``num_samples``."""
    if study.sampler.name == "grid":
        return math.prod(len(dist.grid()) for dist in study.search.values())
    return study.budget.num_samples


def _optuna_storage(url: str) -> Any:
    import optuna

    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # the sweep's own folder
    return optuna.storages.RDBStorage(url)


def max_concurrent_trials(study: Study) -> int:
    """The study's ``budget.max_concurrent``, else as many trials as the cluster's CPUs (and GPUs) hold when
    each takes ``workers * cpus_per_worker`` CPUs (the driver's share included)."""
    if study.budget.max_concurrent:
        return study.budget.max_concurrent
    resources, per_trial = ray.cluster_resources(), study.resources
    fits = _fits(resources.get("CPU", 1), per_trial.workers * per_trial.cpus_per_worker)
    if per_trial.gpus_per_worker:
        fits = min(fits, _fits(resources.get("GPU", 0), per_trial.workers * per_trial.gpus_per_worker))
    if fits < 1:
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        raise InputError(
            f"resources: one trial asks for {per_trial.workers} worker(s) x {per_trial.cpus_per_worker:g} CPU(s) "
            f"and {per_trial.gpus_per_worker:g} GPU(s) each, and the cluster has {cpus:g} CPU(s) and {gpus:g} "
            f"GPU(s) in all: lower them with overrides, e.g. resources.cpus_per_worker="
            f"{max(int(cpus // per_trial.workers), 1)}"
        )
    return fits


def _fits(available: float, per_trial: float) -> int:
    """Whole trials of ``per_trial`` in ``available``, with room for float error (1 // 0.1 is 9.0)."""
    return int(math.floor(available / per_trial + 1e-9))
