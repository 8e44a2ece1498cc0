"""What crosses to a Ray Train worker is one typed, frozen value (no Ray started here)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sr_tune.config import load_config
from sr_tune.distributed import WorkerOptions

from .conftest import REPO


def test_worker_options_are_frozen_typed_and_survive_the_trip_to_a_worker():
    config = load_config(REPO / "configs" / "smoke.yaml", ["optimizer.lr=2e-3"])
    options = WorkerOptions(
        config=config,
        checkpoint_dir="/runs/x",
        run_id="abc",
        tracking_uri="sqlite:////m.db",
        hyperparameters={"optimizer.lr": 2e-3},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.run_id = "other"  # type: ignore[misc]
    arrived = pickle.loads(pickle.dumps(options))
    assert arrived == options and arrived.config.optimizer.lr == 2e-3
    assert (arrived.resume, arrived.close_run, arrived.quiet, arrived.report_gate) == (False, True, False, None)
