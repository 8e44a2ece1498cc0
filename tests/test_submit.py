"""What `sr-tune submit` and `sr-tune tune` check before anything reaches Ray: the job's plan (what ships,
what runs), and inputs refused with one clear line (a tracking server that does not answer, data folders
that do not exist, storage URIs pyarrow cannot open). The cluster itself is in test_cluster.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import sr_tune
from sr_tune.cli import job_command
from sr_tune.fields import ConfigError
from sr_tune.storage import Storage, storage_problem
from sr_tune.submit import plan_job

from .conftest import REPO
from .services import free_port


def write_project(folder: Path, study_extra: str = "", data: str = "sample") -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "base.yaml").write_text((REPO / "configs" / "smoke.yaml").read_text())
    (folder / "study.yaml").write_text(f"""
name: planned
base: configs/base.yaml
fixed: {{data.train: {data}, training.output_dir: runs}}
search:
  optimizer.lr: {{type: loguniform, low: 3.0e-4, high: 3.0e-3}}
budget: {{num_samples: 2, max_steps: 40}}
{study_extra}""")
    return folder


def sr_tune_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SR_TUNE_STORAGE")}
    return subprocess.run(
        [sys.executable, "-m", "sr_tune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


ADDRESS = "https://head.internal:8265"


def test_a_job_ships_the_study_its_config_and_this_package_and_runs_the_command_from_it(tmp_path: Path):
    project = write_project(tmp_path / "my project")
    (project / "notes.txt").write_text("the user's own file, not named by the study")
    plan = plan_job(
        job_command(["tune", str(project / "study.yaml"), "--resume"]),
        working_dir=project,
        address=ADDRESS,
        storage="s3://bucket/sweeps?endpoint_override=10.0.0.5:9000&scheme=http",
        tracking_uri="http://mlflow:5000",
    )
    argv = shlex.split(plan.entrypoint)
    assert argv == [
        "python",
        "-m",
        "sr_tune",
        "tune",
        "study.yaml",  # relative to the shipped folder, where the job runs
        "--resume",
        "--storage",
        "s3://bucket/sweeps?endpoint_override=10.0.0.5:9000&scheme=http",
        "--tracking-uri",
        "http://mlflow:5000",
    ]
    assert plan.files == ("configs/base.yaml", "study.yaml")
    with plan.runtime_env() as runtime_env:
        staged = Path(runtime_env["working_dir"])
        assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == list(plan.files)
        assert (staged / "study.yaml").read_bytes() == (project / "study.yaml").read_bytes()
        assert runtime_env["py_modules"] == [str(Path(sr_tune.__file__).parent)]
    assert not staged.exists()  # removed once Ray has taken it
    assert plan.submission_id.startswith("sr-tune-tune-planned-") and plan.metadata["sr_tune.name"] == "planned"
    again = plan_job(
        job_command(["tune", str(project / "study.yaml")]),
        working_dir=project,
        address=ADDRESS,
        storage="s3://b/x",
        tracking_uri="http://mlflow:5000",
    )
    assert again.submission_id != plan.submission_id  # unique per submission, readable per study


def test_a_job_is_refused_here_for_every_problem_at_once(tmp_path: Path):
    project = write_project(tmp_path / "project", study_extra="keep_checkpoints: 0")
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        plan_job(job_command(["tune", str(project / "study.yaml")]), working_dir=project, address=ADDRESS)
    elsewhere = write_project(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as error:
        plan_job(
            job_command(["tune", str(elsewhere / "study.yaml")]),
            working_dir=tmp_path / "project",
            address=ADDRESS,
            storage="ftp://x/y",
        )
    problems = error.value.problems
    assert any("outside the working directory" in p and "study.yaml" in p for p in problems)
    assert any("its base config" in p for p in problems) and any("--storage 'ftp://x/y'" in p for p in problems)
    with pytest.raises(ConfigError, match="must be one of: tune, train"):
        job_command(["upscale", "x.png"])


def test_storage_uris_are_checked_without_a_request():
    assert storage_problem("/mnt/shared/sweeps") is None and storage_problem("s3://bucket/prefix?scheme=http") is None
    assert "does not open" in storage_problem("ftp://bucket/prefix")
    assert "names no bucket" in storage_problem("s3://")
    local = Storage.at("relative/sweeps")
    assert not local.remote and Path(local.uri).is_absolute() and local.uri_of("a") == str(Path(local.uri) / "a")


def test_tune_refuses_an_unreachable_tracking_server_before_anything_starts(tmp_path: Path):
    project = write_project(tmp_path / "project")
    closed = f"http://127.0.0.1:{free_port()}"
    refused = sr_tune_cli("tune", "study.yaml", "--tracking-uri", closed, cwd=project)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and f"cannot reach the MLflow tracking server at {closed}" in refused.stderr
    assert not (project / "runs").exists()  # nothing started, nothing written


def test_tune_refuses_missing_data_a_bad_storage_uri_and_a_bad_study_key_in_one_round(tmp_path: Path):
    project = write_project(tmp_path / "project", study_extra="keep_checkpoints: 0", data="images/train")
    refused = sr_tune_cli("tune", "study.yaml", "--storage", "ftp://host/x", cwd=project)
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert "data.train: 'images/train' does not exist" in refused.stderr
    assert "--storage 'ftp://host/x' has scheme 'ftp'" in refused.stderr and "keep_checkpoints: 0" in refused.stderr
    assert "3 problem(s)" in refused.stderr
    assert sorted(p.name for p in project.iterdir()) == ["configs", "study.yaml"]  # nothing started, nothing written


def test_the_scratch_folder_never_shadows_the_package_when_run_from_the_temp_folder():
    # `python -m sr_tune` started in /tmp would import a /tmp/sr_tune folder (a namespace package) instead.
    from sr_tune.storage import scratch_dir

    assert scratch_dir().parent == Path(tempfile.gettempdir()) and not scratch_dir().name.isidentifier()
