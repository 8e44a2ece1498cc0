"""``sr-tune submit`` on a real two-node Ray cluster (two raylets on this machine, token auth on), with the
sweep's storage on a real S3 store (SeaweedFS) and MLflow as a real tracking server whose artifacts live in
that store. One cluster serves the whole module; it runs alone, like every test that starts Ray (see
``conftest.pytest_xdist_make_scheduler``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from sr_tune.checkpoint import META_FILE, WEIGHTS_FILE
from sr_tune.data.sources import open_source, sample_images, source_problem, write_shards
from sr_tune.storage import Storage

from .conftest import REPO
from .services import start_mlflow_server, start_ray_cluster, start_seaweedfs

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
BUCKET = "sr-tune-test"


class Cluster:
    """The module's servers, and ``sr-tune`` run as a user's shell runs it."""

    def __init__(self, root: Path, started: list) -> None:
        """Each server is added to ``started`` as soon as it runs, so that a later one failing stops it too."""
        self.root, self.started = root, started
        self.s3 = start_seaweedfs(root / "s3")
        started.append(self.s3.service)
        self.tracking_uri, self.mlflow_server = start_mlflow_server(root / "mlflow", self.s3, BUCKET)
        started.append(self.mlflow_server)
        self.ray = start_ray_cluster(root / "ray", self.s3.env())
        started.append(self.ray)
        self.storage = self.s3.uri(f"{BUCKET}/sweeps")

    def env(self, **changes: str | None) -> dict[str, str]:
        """The submitting user's environment: the cluster's token and no Ray or MLflow settings of this test
        process; ``changes`` set (or with None, remove) variables, and HOME is a folder without a token file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update(HOME=str(self.root / "home"), RAY_AUTH_TOKEN=self.ray.token)
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def sr_tune(self, *args: str, cwd: Path, timeout: float = 600, **env: str | None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sr_tune", *args],
            cwd=cwd,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def free_cpus(self) -> float:
        """The CPUs no task or actor holds, as the cluster's scheduler counts them."""
        probe = "import ray; ray.init(); print(ray.available_resources().get('CPU', 0.0))"
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env={**self.ray.env, "RAY_ADDRESS": self.ray.gcs_address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    def submit(
        self, project: Path, *job: str, flags: tuple[str, ...] = (), **env: str | None
    ) -> subprocess.CompletedProcess:
        options = ["--address", self.ray.address, "--storage", self.storage, "--tracking-uri", self.tracking_uri]
        return self.sr_tune("submit", *options, *flags, "--", *job, cwd=project, **env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    (root / "home").mkdir()
    started: list = []
    try:
        yield Cluster(root, started)
    finally:
        for service in reversed(started):
            service.stop()


def write_project(folder: Path, name: str, data: str = "sample") -> Path:
    """A user's project folder: a study and its base config (relative), as `sr-tune submit` ships it."""
    folder.mkdir(parents=True)
    (folder / "configs").mkdir()
    (folder / "configs" / "base.yaml").write_text((REPO / "configs" / "smoke.yaml").read_text())
    (folder / "study.yaml").write_text(f"""
name: {name}
base: configs/base.yaml
fixed:
  training.device: cpu
  training.eval_interval: 20
  data.batch_size: 8
  data.val_crop: 48
  data.train: {data}
search:
  optimizer.lr: {{type: loguniform, low: 3.0e-4, high: 3.0e-3}}
sampler: {{name: random, seed: 0}}
scheduler: {{name: none}}
budget: {{num_samples: 4, max_steps: 40, max_concurrent: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
keep_checkpoints: 1
""")
    return folder


def test_storage_and_data_shards_live_in_s3(cluster: Cluster):
    storage = Storage.at(cluster.s3.uri(f"{BUCKET}/storage-check"))
    assert storage.remote and storage.uri_of("x.train").startswith(f"s3://{BUCKET}/storage-check/x.train?")
    os.environ.update(cluster.s3.env())
    try:
        storage.write_text(storage.path_of("state.json"), '{"a": 1}')
        storage.write_text(storage.path_of("folder/one.txt"), "1")
        storage.write_text(storage.path_of("folder/sub/two.txt"), "2")
        assert storage.read_text(storage.path_of("state.json")) == '{"a": 1}'
        assert [p.rsplit("/", 1)[-1] for p in storage.list_files(storage.path_of("folder"))] == ["one.txt", "two.txt"]
        with storage.local_copy(storage.path_of("folder")) as local:
            assert (local / "sub" / "two.txt").read_text() == "2"
        storage.delete_dir(storage.path_of("folder"))
        assert storage.list_files(storage.path_of("folder")) == []

        # Training data as Parquet shards in the bucket, read by URI as a worker on any node reads it.
        shards = cluster.s3.uri(f"{BUCKET}/data/sample")
        assert "holds no manifest.json" in source_problem(shards)
        images = sample_images("train")
        write_shards(images, shards, shard_bytes=1 << 20)
        assert source_problem(shards) is None
        read = {image.name: image.hr for image in open_source(shards, "train")}
        assert sorted(read) == sorted(image.name for image in images)
        assert all(torch.equal(read[image.name], image.hr) for image in images)
    finally:
        for key in cluster.s3.env():
            os.environ.pop(key, None)


def _files(s3: pafs.FileSystem, folder: str) -> list[str]:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return sorted(info.path for info in s3.get_file_info(selector) if info.type == pafs.FileType.File)


def test_a_submitted_sweep_runs_on_both_nodes_with_its_output_in_s3_and_its_runs_on_the_server(
    cluster: Cluster, tmp_path: Path
):
    project = write_project(tmp_path / "project", "cluster_sweep")
    study = (project / "study.yaml").read_text()
    (project / "study.yaml").write_text(study.replace("num_samples: 4", "num_samples: 2"))  # one on each node
    (project / "runs").mkdir()  # a local output folder a user may have: the job neither ships nor writes it
    (project / "runs" / "big.bin").write_bytes(os.urandom(1 << 20))
    s3, experiment = cluster.s3.filesystem(), f"{BUCKET}/sweeps/cluster_sweep"
    address = ["--address", cluster.ray.address]

    done = cluster.submit(project, "tune", "study.yaml")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    job_id = done.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    assert job_id.startswith("sr-tune-tune-cluster_sweep-")
    assert f"{cluster.ray.address}/#/jobs/{job_id}" in done.stdout
    assert "best 2 of 2 trial(s) of cluster_sweep" in done.stdout  # the job's own console, streamed here
    assert f"job {job_id} SUCCEEDED" in done.stdout and "Trial status" not in done.stdout
    assert not (project / "runs" / "sweeps").exists() and sorted(os.listdir(project / "runs")) == ["big.bin"]

    # Every trial's kept checkpoint is in the bucket, read back through pyarrow.
    files = _files(s3, experiment)
    trials = {path.split("/")[3] for path in files if "/trial_" in path}
    assert len(trials) == 2
    for trial in trials:
        kept = {path.split("/")[4] for path in files if f"/{trial}/checkpoint_" in path}
        assert len(kept) == 1, (trial, kept)
        assert {f"{experiment}/{trial}/{c}/{f}" for c in kept for f in (WEIGHTS_FILE, META_FILE)} <= set(files)
    assert s3.get_file_info(f"{BUCKET}/sweeps/cluster_sweep.json").type == pafs.FileType.File

    # The runs, read back from the server over HTTP: one per trial, on both nodes, grids downloadable.
    client = MlflowClient(cluster.tracking_uri)
    mlflow_experiment = client.get_experiment_by_name("sr_tune")
    assert mlflow_experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([mlflow_experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == len(runs) - 1 == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_psnr")] == [20, 40]
    nodes = {child.data.tags["sr_tune.node_id"] for child in children}
    assert len(nodes) == 2, nodes
    best = client.get_run(parents[0].data.tags["sr_tune.best_run_id"])
    grid_path = client.download_artifacts(best.info.run_id, "grids/step_0000040.png", str(tmp_path / "download"))
    grid = np.asarray(Image.open(grid_path))
    assert grid.shape[0] > 192 and grid.std() > 10

    # Submitted again: refused (Tune would overwrite the sweep's state) unless --resume, which shows the
    # finished sweep and adds nothing.
    refused = cluster.submit(project, "tune", "study.yaml")
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "holds an earlier sweep of study 'cluster_sweep': add --resume" in refused.stdout
    again = cluster.submit(project, "tune", "study.yaml", "--resume")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert "2 done" in again.stdout and "best 2 of 2 trial(s) of cluster_sweep" in again.stdout
    assert len(client.search_runs([mlflow_experiment.experiment_id], max_results=100)) == len(runs)

    status = cluster.sr_tune("jobs", "status", job_id, *address, cwd=tmp_path)
    assert status.returncode == 0 and f"job {job_id} SUCCEEDED" in status.stdout
    stop = cluster.sr_tune("jobs", "stop", job_id, *address, cwd=tmp_path)
    assert stop.returncode == 0 and f"job {job_id}: had already ended" in stop.stdout
    listed = cluster.sr_tune("jobs", "list", *address, cwd=tmp_path)
    assert listed.returncode == 0 and job_id in listed.stdout and listed.stdout.count(" SUCCEEDED ") == 2
    assert listed.stdout.count(" FAILED ") == 1  # the refused resubmission


def test_a_job_whose_data_the_cluster_lacks_fails_with_the_problem_list(cluster: Cluster, tmp_path: Path):
    project = write_project(tmp_path / "project", "no_data", data="/nonexistent/div2k")
    failed = cluster.submit(project, "tune", "study.yaml")
    assert failed.returncode == 2, failed.stdout[-3000:]
    assert "data.train: '/nonexistent/div2k' does not exist" in failed.stdout
    assert "FAILED" in failed.stdout and "Traceback" not in failed.stdout + failed.stderr


def test_a_bad_study_is_refused_before_anything_is_submitted(cluster: Cluster, tmp_path: Path):
    project = write_project(tmp_path / "project", "bad")
    study = (project / "study.yaml").read_text()
    (project / "study.yaml").write_text(study.replace("max_steps: 40", "max_stepz: 40"))
    refused = cluster.submit(project, "tune", "study.yaml")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "budget.max_stepz" in refused.stderr and "Traceback" not in refused.stderr
    outside = cluster.submit(project, "tune", str(REPO / "search_spaces" / "quickstart.yaml"))
    assert outside.returncode == 2 and "outside the working directory" in outside.stderr


def test_jobs_of_an_unknown_id_are_one_line(cluster: Cluster, tmp_path: Path):
    for action in (["logs", "no-such-job", "--follow"], ["logs", "no-such-job"], ["status", "no-such-job"]):
        done = cluster.sr_tune("jobs", *action, "--address", cluster.ray.address, cwd=tmp_path, timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
        assert "no-such-job" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("token", "expected"),
    [(None, "requires a token and none was sent"), ("0" * 64, "refused the token (not this cluster's)")],
)
def test_a_missing_or_wrong_ray_token_is_one_clear_line(cluster: Cluster, tmp_path: Path, token, expected):
    project = write_project(tmp_path / "project", "tokens")
    refused = cluster.submit(project, "tune", "study.yaml", RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="token")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and expected in refused.stderr, refused.stderr


def test_the_token_file_is_found_and_sent_without_any_setting(cluster: Cluster, tmp_path: Path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(cluster.ray.token)
    listed = cluster.sr_tune(
        "jobs", "list", "--address", cluster.ray.address, cwd=tmp_path, HOME=str(home), RAY_AUTH_TOKEN=None
    )
    assert listed.returncode == 0 and listed.stdout.startswith("submission id"), listed.stderr
    unknown = cluster.sr_tune("jobs", "status", "no-such-job", "--address", cluster.ray.address, cwd=tmp_path)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1 and "no-such-job" in unknown.stderr


def test_a_sweep_whose_every_trial_fails_exits_1_and_its_parent_run_is_failed(cluster: Cluster, tmp_path: Path):
    project = write_project(tmp_path / "project", "diverges")
    # SGD at lr 5-10 with momentum 0.99: the loss leaves the finite numbers before the first evaluation.
    study = (project / "study.yaml").read_text()
    study = study.replace(
        "training.device: cpu", "training.device: cpu\n  optimizer.name: sgd\n  optimizer.momentum: 0.99"
    )
    study = study.replace("low: 3.0e-4, high: 3.0e-3", "low: 5.0, high: 10.0").replace(
        "num_samples: 4", "num_samples: 1"
    )
    (project / "study.yaml").write_text(study)
    failed = cluster.submit(project, "tune", "study.yaml")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-2000:]
    assert "no trial of study 'diverges' succeeded" in failed.stdout and "loss term pixel" in failed.stdout
    client = MlflowClient(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("sr_tune").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`sr_tune.study` = 'diverges'")
    parents = [run for run in parent if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FAILED"]


def test_a_sweep_survives_the_loss_of_a_node_and_a_tracking_server_outage(cluster: Cluster, tmp_path: Path):
    """Runs last: the second node is stopped for good. Its trial fails with it, Tune starts it again on the
    head (``distributed.max_failures``) from its last checkpoint in S3, and the sweep completes; meanwhile
    the MLflow server is down for 10 s, and every evaluation still reaches it."""
    deadline = time.monotonic() + 120
    while (free := cluster.free_cpus()) < 2:  # what earlier jobs held is given back: a trial for each node
        assert time.monotonic() < deadline, f"the cluster still has only {free} free CPU(s)"
        time.sleep(2)
    project = write_project(tmp_path / "project", "node_lost")
    study = (project / "study.yaml").read_text()
    study = study.replace("training.device: cpu", "training.device: cpu\n  distributed.max_failures: 2")
    study = study.replace("num_samples: 4", "num_samples: 2").replace("max_steps: 40", "max_steps: 60")
    (project / "study.yaml").write_text(study)
    submitted = cluster.submit(project, "tune", "study.yaml", flags=("--no-wait",))
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    job_id = submitted.stdout.split("submitted job ", 1)[1].split(":", 1)[0]

    client = MlflowClient(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("sr_tune").experiment_id

    def trial_runs_logged() -> dict[str, list[int]]:
        runs = client.search_runs([experiment], "tags.`sr_tune.study` = 'node_lost'")
        return {
            run.data.tags["sr_tune.node_id"]: [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")]
            for run in runs
            if "sr_tune.node_id" in run.data.tags
        }

    deadline = time.monotonic() + 300
    while not (len(logged := trial_runs_logged()) == 2 and all(logged.values())):  # both nodes train
        assert time.monotonic() < deadline, logged
        time.sleep(1)
    cluster.ray.nodes[1].kill()  # node_b: its raylet, workers and trial, gone at once
    # And the tracking server goes away for a while: the trial still training and the restarted one go on.
    cluster.mlflow_server.stop()
    time.sleep(10)
    port = int(cluster.tracking_uri.rsplit(":", 1)[1])
    _, cluster.mlflow_server = start_mlflow_server(cluster.root / "mlflow", cluster.s3, BUCKET, port=port)
    cluster.started.append(cluster.mlflow_server)

    followed = cluster.sr_tune("jobs", "logs", job_id, "--follow", "--address", cluster.ray.address, cwd=tmp_path)
    status = cluster.sr_tune("jobs", "status", job_id, "--address", cluster.ray.address, cwd=tmp_path)
    assert f"job {job_id} SUCCEEDED" in status.stdout, followed.stdout[-4000:] + status.stdout
    assert "best 2 of 2 trial(s) of node_lost" in followed.stdout
    runs = client.search_runs([experiment], "tags.`sr_tune.study` = 'node_lost'")
    trials = [run for run in runs if "sr_tune.trial_id" in run.data.tags]
    assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
    for run in trials:  # the restarted trial's run continued: each evaluation once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [20, 40, 60]
