"""Secrets stay on the machine and names stay in their folders: what a job ships (from a home-like folder full
of keys), credentials inside URIs (refused, never echoed, redacted wherever a command line is recorded), the
Ray token over plain http, names that would become paths, the shared temp folder, and a crafted checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from sr_tune.checkpoint import load_checkpoint
from sr_tune.cli import job_command
from sr_tune.config import load_config
from sr_tune.credentials import credential_problem, redact
from sr_tune.data.sources import skimage_photo
from sr_tune.fields import ConfigError
from sr_tune.storage import scratch_dir
from sr_tune.submit import plan_job

from ..conftest import REPO
from .test_data_loss import hashes, refused, small_checkpoint, sr_tune

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
REMOTE = "https://head.example.com:8265"


def home_like(folder: Path) -> Path:
    """A home folder: keys, cloud credentials, an env file, the Ray token, and a project in a subfolder."""
    for name, text in {
        ".ssh/id_ed25519": "-----BEGIN OPENSSH PRIVATE KEY-----",
        ".aws/credentials": f"[default]\naws_secret_access_key = {SECRET}",
        ".env": f"MLFLOW_TRACKING_PASSWORD={SECRET}",
        ".ray/auth_token": SECRET,
        "project/secrets/api.key": SECRET,
        "project/data/train/.netrc": SECRET,
        "project/notes.txt": "private notes",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    project = folder / "project"
    (project / "configs").mkdir()
    (project / "configs" / "base.yaml").write_text((REPO / "configs" / "smoke.yaml").read_text())
    Image.fromarray(skimage_photo("coffee").permute(1, 2, 0).numpy()).save(project / "data" / "train" / "a.png")
    (project / "study.yaml").write_text("""
name: shipped
base: configs/base.yaml
fixed: {data.train: data/train}
search:
  optimizer.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
""")
    return folder


def remote_plan(project: Path, include: list[Path]):
    """The plan of a sweep of ``project`` on a remote cluster with storage and a tracking server."""
    return plan_job(
        job_command(["tune", str(project / "study.yaml")]),
        working_dir=project,
        address=REMOTE,
        storage="s3://bucket/sweeps",
        tracking_uri="https://mlflow.example.com",
        include=include,
    )


def dry_run(folder: Path, *extra: str, home: Path) -> subprocess.CompletedProcess[str]:
    remote = ["--address", REMOTE, "--storage", "s3://b/x", "--tracking-uri", "https://m", *extra]
    return sr_tune("submit", *remote, "--dry-run", "--", "tune", "study.yaml", cwd=folder, HOME=str(home))


def test_a_job_ships_only_what_it_needs_never_a_key_and_never_from_home(tmp_path: Path):
    home = home_like(tmp_path / "home")
    project = home / "project"
    plan = remote_plan(project, [project / "data", project / "notes.txt"])  # data/train/.netrc stays behind
    assert plan.files == ("configs/base.yaml", "data/train/a.png", "notes.txt", "study.yaml")
    with plan.runtime_env() as runtime_env:
        shipped = hashes(Path(runtime_env["working_dir"]))
    assert sorted(shipped) == list(plan.files) and SECRET not in plan.describe()
    with pytest.raises(ConfigError, match="never shipped"):  # named directly, a key file is refused, not skipped
        remote_plan(project, [project / "secrets" / "api.key"])

    # Whatever their names: a link out of the project, a key's or credentials' content.
    (project / "data" / "train" / "b.png").symlink_to(home / ".ssh" / "id_ed25519")
    (project / "data" / "train" / "readme.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...")
    (project / "data" / "train" / "c.txt").write_text(f"[default]\naws_secret_access_key={SECRET}")
    plan = remote_plan(project, [project / "data"])
    assert plan.files == ("configs/base.yaml", "data/train/a.png", "study.yaml")
    left = ("data/train/.netrc", "data/train/b.png", "data/train/c.txt", "data/train/readme.txt")
    assert plan.left_behind == left and "leaves behind 4 file(s)" in plan.describe()
    for named, said in (("b.png", "outside the working directory"), ("readme.txt", "holds a private key")):
        with pytest.raises(ConfigError, match=said):
            remote_plan(project, [project / "data" / "train" / named])
    for name in ("b.png", "readme.txt", "c.txt"):
        (project / "data" / "train" / name).unlink()

    # From the home folder itself: refused, whatever the study.
    (home / "study.yaml").write_text((project / "study.yaml").read_text())
    (home / "configs").mkdir()
    (home / "configs" / "base.yaml").write_text((project / "configs" / "base.yaml").read_text())
    (home / "data").symlink_to(project / "data")
    assert "your home folder" in refused(dry_run(home, home=home))

    # --dry-run prints the plan and submits nothing (no cluster at this address).
    result = dry_run(project, home=home)
    assert result.returncode == 0, result.stderr
    assert "ships 3 file(s)" in result.stdout and "    study.yaml\n" in result.stdout and ".ssh" not in result.stdout


def test_a_job_whose_results_would_vanish_with_its_working_directory_is_refused(tmp_path: Path):
    project = home_like(tmp_path / "home") / "project"
    with pytest.raises(ConfigError, match="vanish with it: give --storage"):
        plan_job(job_command(["tune", str(project / "study.yaml")]), working_dir=project, address=REMOTE)
    with pytest.raises(ConfigError, match="vanish"):  # storage alone: the runs would still be lost
        plan_job(
            job_command(["tune", str(project / "study.yaml")]), working_dir=project, address=REMOTE, storage="s3://b/x"
        )
    local = plan_job(
        job_command(["tune", str(project / "study.yaml")]), working_dir=project, address="http://127.0.0.1:8265"
    )
    assert "--storage" not in local.entrypoint  # a local cluster shares this machine's disk


def test_credentials_in_uris_are_refused_without_being_echoed(tmp_path: Path):
    home = home_like(tmp_path / "home")
    project = home / "project"
    for flag, uri in (
        ("--storage", f"s3://AKIAEXAMPLE:{SECRET}@bucket/sweeps"),
        ("--storage", f"s3://bucket/sweeps?access_key=AKIA&secret_key={SECRET}"),
        ("--tracking-uri", f"http://user:{SECRET}@127.0.0.1:5000"),
    ):
        result = sr_tune("tune", "study.yaml", flag, uri, cwd=project)
        message = refused(result)
        assert "carries credentials" in message and SECRET not in message + result.stdout
    result = sr_tune("tune", "study.yaml", cwd=project, MLFLOW_TRACKING_URI=f"https://u:{SECRET}@mlflow.example.com")
    assert "carries credentials" in refused(result) and SECRET not in result.stderr
    result = sr_tune(
        "train", str(REPO / "configs" / "smoke.yaml"), f"data.train=s3://K:{SECRET}@bucket/shards", cwd=project
    )
    assert "data.train" in refused(result) and SECRET not in result.stderr
    result = sr_tune(
        "submit",
        "--address",
        REMOTE,
        "--storage",
        f"gs://k:{SECRET}@b/x",
        "--tracking-uri",
        "https://m",
        "--dry-run",
        "--",
        "tune",
        "study.yaml",
        cwd=project,
    )
    assert "carries credentials" in refused(result) and SECRET not in result.stderr
    assert sorted(p.name for p in project.iterdir()) == ["configs", "data", "notes.txt", "secrets", "study.yaml"]


def test_redaction_covers_every_place_a_command_line_is_recorded(tmp_path: Path):
    assert redact(f"tune --storage s3://KEY:{SECRET}@b/x") == "tune --storage s3://***@b/x"
    assert (
        redact(f"s3://b/x?scheme=http&secret_key={SECRET}&region=eu") == "s3://b/x?scheme=http&secret_key=***&region=eu"
    )
    assert redact(f"AWS_SECRET_ACCESS_KEY={SECRET} RAY_AUTH_TOKEN={SECRET} lr=1e-3").count("***") == 2
    assert credential_problem("s3://bucket/x?endpoint_override=h:9000&scheme=http") is None
    assert credential_problem("hdfs://user@namenode:8020/x") is None and credential_problem("sqlite:///m.db") is None

    # The MLflow `command` tag and the sweep log's header line of a real run, with a secret on the command line.
    runs, store = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = f"""
import sys
from mlflow import MlflowClient
from PIL import Image
from sr_tune.console import ray_output_to
from sr_tune.tracking import run_tags, start_run
sys.argv = ["sr-tune", "tune", "s.yaml", "--note", "s3://KEY:{SECRET}@bucket/x?token={SECRET}"]
start_run(MlflowClient("{store}"), "sr_tune", name="r", tags=run_tags(), params={{}})
with ray_output_to(__import__("pathlib").Path("{runs}/s.log")):
    pass
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("sr_tune").experiment_id])
    assert SECRET not in run.data.tags["command"] and "s3://***@bucket" in run.data.tags["command"]
    assert SECRET not in (runs / "s.log").read_text() and "token=***" in (runs / "s.log").read_text()


def test_the_ray_token_is_never_sent_in_clear_to_another_host(tmp_path: Path):
    for command in (["jobs", "list"], ["jobs", "stop", "some-job"]):
        result = sr_tune(*command, "--address", "http://10.255.255.1:8265", cwd=tmp_path, RAY_AUTH_TOKEN=SECRET)
        assert "in clear" in refused(result) and "https://" in result.stderr and "--insecure" in result.stderr
    # A loopback address (a port-forward) is fine: refused only because nothing listens there.
    result = sr_tune("jobs", "list", "--address", "http://127.0.0.1:9", cwd=tmp_path, RAY_AUTH_TOKEN=SECRET)
    assert result.returncode == 1 and "cannot reach the Ray dashboard" in result.stderr


def test_names_that_would_become_paths_are_refused(tmp_path: Path):
    for name in ("../../x", "/abs/x", "a/b", "..", "with space"):
        with pytest.raises(ConfigError, match="is not a valid name"):
            load_config(None, [f"tracking.run_name={name}"])
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: ../../escaped
base: {REPO / "configs" / "smoke.yaml"}
search: {{optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}}}
""")
    assert "name: '../../escaped' is not a valid name" in refused(sr_tune("tune", str(study), cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_the_scratch_folder_is_private_and_a_planted_link_is_refused(tmp_path: Path):
    root = scratch_dir()
    assert root.stat().st_mode & 0o777 == 0o700 and root.name == f"sr-tune-scratch-{os.getuid()}"
    shared = tmp_path / "tmp"
    shared.mkdir()
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (shared / f"sr-tune-scratch-{os.getuid()}").symlink_to(elsewhere)
    probe = "from sr_tune.storage import scratch_dir; scratch_dir('x')"
    done = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "TMPDIR": str(shared)}, capture_output=True, text=True
    )
    assert done.returncode != 0 and "is a link or not a folder" in done.stderr
    open_folder = tmp_path / "tmp2"
    (open_folder / f"sr-tune-scratch-{os.getuid()}").mkdir(parents=True, mode=0o777)
    os.chmod(open_folder / f"sr-tune-scratch-{os.getuid()}", 0o777)
    done = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "TMPDIR": str(open_folder)}, capture_output=True, text=True
    )
    assert done.returncode != 0 and "open to other users" in done.stderr
    assert tempfile.gettempdir() != str(shared)

    # The sweep log is never opened through a link.
    from sr_tune.console import ray_output_to

    target = tmp_path / "victim.txt"
    target.write_text("kept")
    (tmp_path / "s.log").symlink_to(target)
    with pytest.raises(FileExistsError, match="a link is refused"), ray_output_to(tmp_path / "s.log"):
        pass
    assert target.read_text() == "kept"


def test_a_crafted_checkpoint_is_one_line_naming_its_file(tmp_path: Path):
    checkpoint = small_checkpoint(tmp_path / "ckpt")
    meta_file = checkpoint / "checkpoint.json"
    good = json.loads(meta_file.read_text())
    for crafted, said in (
        ([1, 2, 3], "a JSON object is expected"),
        ({**good, "step": "x"}, "step: str (expected int)"),
        ({k: v for k, v in good.items() if k != "config"}, "config: missing (expected dict)"),
        ({**good, "state": []}, "state: list (expected dict)"),
    ):
        meta_file.write_text(json.dumps(crafted))
        with pytest.raises(ValueError, match=re.escape(said)):
            load_checkpoint(checkpoint)
    # Weights of another model under this description: named at use, as one line, not a traceback.
    meta_file.write_text(json.dumps({**good, "config": {**good["config"], "model": {"name": "espcn", "scale": 2}}}))
    with pytest.raises(ValueError, match="the weights do not fit espcn x2"):
        load_checkpoint(checkpoint).build_model()
    result = sr_tune("upscale", str(REPO / "README.md"), "--checkpoint", str(checkpoint), "--out", "o", cwd=tmp_path)
    assert "README.md: cannot decode image" in refused(result) and not (tmp_path / "o").exists()
    photo = tmp_path / "photo.png"
    Image.fromarray(skimage_photo("coffee")[:, :40, :40].permute(1, 2, 0).numpy()).save(photo)
    result = sr_tune("upscale", str(photo), "--checkpoint", str(checkpoint), "--out", "o", cwd=tmp_path)
    assert "the weights do not fit espcn x2" in refused(result) and not (tmp_path / "o").exists()


def test_a_crafted_checkpoint_with_huge_model_arguments_is_refused_before_anything_is_built(tmp_path: Path):
    checkpoint = small_checkpoint(tmp_path / "ckpt")
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    meta["config"]["model"].update(name="fsrcnn", kwargs={"d": 1024, "s": 1024, "m": 1024})  # 9.7 G parameters
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="9,668,202,499 parameters, more than the 100,000,000 allowed"):
        load_checkpoint(checkpoint)
    meta["config"]["model"]["kwargs"] = {"m": 10**9}
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"kwargs.m: 1000000000 is out of range \(allowed: >= 1 and <= 1024\)"):
        load_checkpoint(checkpoint)
