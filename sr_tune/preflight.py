"""What a command checks before anything starts (no Ray, no MLflow store, no file written): the data
folders and their images, a storage root, a local Ray's room for one trial, and the data of a config that did
not build (reported with its other problems, in one round)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sr_tune.config import TrainConfig, config_values
from sr_tune.fields import ConfigError

if TYPE_CHECKING:
    from sr_tune.study import Study


def raw_data_problems(path: str, overrides: Sequence[str]) -> list[str]:
    """The data folders' problems of a config that does not build (its other problems are reported with
    these): missing or unreachable ``data.train`` / ``data.val``."""
    from sr_tune.data.sources import source_problem

    try:
        data = config_values(path, overrides).get("data")
    except ConfigError:
        return []  # the file itself is reported
    specs = {key: data.get(key, "sample") for key in ("train", "val")} if isinstance(data, dict) else {}
    return [
        f"data.{key}: {problem}"
        for key, spec in specs.items()
        if isinstance(spec, str) and (problem := source_problem(spec))
    ]


def resource_problems(study: Study) -> list[str]:
    """On a local Ray (no ``RAY_ADDRESS``), what one trial asks for that this machine does not have, with the
    overrides that make it fit; a cluster's resources are checked once the sweep has connected to it."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    import torch

    cpus, gpus, asked = os.cpu_count() or 1, torch.cuda.device_count(), study.resources
    problems = []
    if asked.workers * asked.cpus_per_worker > cpus:
        problems.append(
            f"resources: one trial asks for {asked.workers} worker(s) x {asked.cpus_per_worker:g} CPU(s) and this "
            f"machine has {cpus}: run it with the override resources=local (fits the trial to this machine)"
        )
    if asked.gpus_per_worker and asked.workers * asked.gpus_per_worker > gpus:
        problems.append(
            f"resources: one trial asks for {asked.workers} worker(s) x {asked.gpus_per_worker:g} GPU(s) and this "
            f"machine has {gpus}: run it on the CPU with the override resources=local"
        )
    return problems


def storage_problems(named: str, location: str) -> list[str]:
    """Why ``location`` (given as ``named``) cannot be a storage root: a scheme pyarrow does not open,
    credentials in it, or (checked last, one request of at most a few seconds) a remote store that does not
    answer from here."""
    from sr_tune.storage import reach_problem, storage_problem

    problem = storage_problem(location) or reach_problem(location)
    return [f"{named} {location!r} {problem}"] if problem else []


def data_problems(config: TrainConfig) -> list[str]:
    """Why the data folders (or shard URIs) cannot be read where this command runs: missing, unreachable, or
    holding an image that would fail to decode (unless ``data.skip_bad``). Found before anything starts."""
    from sr_tune.data.sources import source_image_problems, source_problem

    problems = []
    for key in ("train", "val"):
        spec = getattr(config.data, key)
        if problem := source_problem(spec):
            problems.append(f"data.{key}: {problem}")
        elif key == "train" or spec != config.data.train:
            problems.extend(
                f"data.{key}: {problem} (data.skip_bad=true skips such images)"
                for problem in source_image_problems(spec, skip_bad=config.data.skip_bad)
            )
    return problems
