"""A local Ray that listens on 127.0.0.1 only, and Ray Train process groups that do too on such a Ray.

On Linux Ray takes the machine's external address as a local node's (even for ``_node_ip_address=
"127.0.0.1"``), and its GCS, raylet, workers and agents listen on all interfaces. Ray's single-machine mode,
its default on macOS and Windows, keeps them all on 127.0.0.1. Ray Train then joins each run's
``torch.distributed`` process group through a TCPStore on rank 0, which PyTorch binds to all interfaces
(it has no setting for the address); on a loopback-only Ray the workers share this machine, so they join
through a file instead, and gloo and NCCL open their own sockets on the loopback interface.

Every private Ray name sr_tune uses is touched here and nowhere else (``RAY_PRIVATE_NAMES``,
``TRIAL_PRIVATE_ATTRIBUTES``), each behind a function or class of this module, and each resolved by a test
on the tested Ray (``TESTED_RAY``, the minor ``pyproject.toml`` pins): the single-machine switch, Ray Train's
torch backend, Tune's trial internals, how Tune's loop takes a stop signal and the Jobs client's request method.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as torch_dist
from ray._private import ray_constants
from ray.train._internal.utils import get_address_and_port
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# sr_tune is tested on this Ray minor (pyproject pins it: ray ~= 2.60.0) and uses these private names of it,
# which another release may move or change; tests/reliability/test_cluster_hardening.py resolves each one.
TESTED_RAY = "2.60"
RAY_PRIVATE_NAMES = (
    "ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR",
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER",
    "ray.train._internal.utils.get_address_and_port",
    "ray.train.torch.config._set_torch_distributed_env_vars",
    "ray.train.torch.config._TorchBackend",
    "ray.train.v2.api.callback.UserCallback",
    "ray.dashboard.modules.dashboard_sdk.SubmissionClient._do_request",
    "ray.tune.tune._setup_signal_catching",
)
# Attributes of Tune's ``Trial`` objects (its callbacks' arguments) that sr_tune reads, each through one
# function below; tests/reliability/test_cluster_hardening.py reads each on a real ``Trial``.
TRIAL_PRIVATE_ATTRIBUTES = ("experiment_tag", "run_metadata.checkpoint_manager.best_checkpoint_result")


def bounded_job_client(address: str, timeouts: Callable[[str], tuple[float, float]]) -> Any:
    """A Ray Jobs ``JobSubmissionClient`` of the dashboard at ``address`` whose every request carries
    ``timeouts(method)`` (connect, read): Ray's client sets none. ``_do_request`` is the one place that client
    calls ``requests.request``."""
    from ray.job_submission import JobSubmissionClient

    class BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeouts(method))
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedJobSubmissionClient(address)


class TuneStopWatch:
    """Whether a stop signal (Ctrl-C, or SIGTERM raised again as SIGINT) ended Tune's loop. Tune has no public
    word for it: its loop installs a SIGINT handler (``ray.tune.tune._setup_signal_catching``) that, on the
    signal, ends the loop and puts back the handler it replaced. ``loop_running`` is called from a callback
    inside the loop, ``stopped`` after it."""

    def __init__(self) -> None:
        self.tune_handler: Any = None

    def loop_running(self) -> None:
        if self.tune_handler is None:
            self.tune_handler = signal.getsignal(signal.SIGINT)

    def stopped(self) -> bool:
        return self.tune_handler is not None and signal.getsignal(signal.SIGINT) is not self.tune_handler


def trial_number(trial: Any) -> int:
    """The trial's number in its sweep, the integer that leads Tune's experiment tag (``3_lr=0.01``): counted
    from 1 by a search algorithm's generator, from 0 by PBT's variant generator. A resumed sweep keeps it."""
    return int(trial.experiment_tag.split("_")[0])


def best_checkpoint(trial: Any) -> tuple[str | None, dict[str, Any]]:
    """(path, metrics) of the trial's best checkpoint by the objective, Tune's copy; (None, {}) before any."""
    best = trial.run_metadata.checkpoint_manager.best_checkpoint_result
    return (best.checkpoint.path, best.metrics) if best else (None, {})


@contextlib.contextmanager
def single_machine_ray() -> Iterator[None]:
    """Ray's single-machine mode while a local Ray starts: read by this process (Ray is imported already)
    and by the processes Ray starts, which inherit the environment."""
    saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved[0] is None:
            del os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR]
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


class LoopbackTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig``; on a loopback-only Ray the process group is joined through a file."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def __init__(self) -> None:
        super().__init__()
        self.store_dir: str | None = None

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        address, _ = worker_group.execute_single(0, get_address_and_port)
        if not ipaddress.ip_address(address).is_loopback:  # a cluster: Ray Train's own TCP rendezvous
            super().on_start(worker_group, backend_config)
            return
        self.store_dir = tempfile.mkdtemp(prefix="sr-tune-process-group-")
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        joined = [
            worker_group.execute_single_async(
                rank,
                _join_through_file,
                backend=backend_config.backend,
                store=os.path.join(self.store_dir, "store"),
                world_rank=rank,
                world_size=world_size,
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(world_size)
        ]
        ray.get(joined)

    def on_shutdown(self, worker_group: Any, backend_config: TorchConfig) -> None:
        super().on_shutdown(worker_group, backend_config)
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def _join_through_file(backend: str, store: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    """Runs on each worker: gloo's pair sockets and NCCL's bootstrap on ``lo``, the rendezvous in a file."""
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    torch_dist.init_process_group(
        backend=backend,
        store=torch_dist.FileStore(store, world_size),
        rank=world_rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
