"""Jobs on a Ray cluster through the Ray Jobs API: ``sr-tune submit`` and ``sr-tune jobs``.

A job runs one ``sr-tune`` command (``tune STUDY`` or ``train CONFIG``) on the cluster's head node, where it
is the Ray driver of the sweep. What it needs travels with it in the job's ``runtime_env``:

- ``working_dir``: the project folder (the study, its base config, anything they name by a relative path),
  without outputs and environments (``JOB_EXCLUDES``); the command runs from its unpacked copy.
- ``py_modules``: this ``sr_tune`` package as it is here, so the cluster runs the code that checked the
  study; its dependencies (torch, Ray, MLflow, ...) come from the cluster's image or setup commands, because
  installing torch per job would take minutes and gigabytes.

The command is checked here first (the study or config loads, and every file it names lies in the working
directory); what only the cluster can tell (data folders, storage, the tracking server, an earlier sweep)
the job checks before it starts anything, and ``submit`` prints its error and exits with its code.

Ray 2.59+ clusters require a token (``RAY_AUTH_MODE=token``): it is read from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, and sent with every request.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import sr_tune
from sr_tune.config import ConfigError

# Outputs, stores and environments never travel: a job writes its own outputs to the sweep's storage.
JOB_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "mlflow.db",
    "optuna.db",
    "*.log",
    "__pycache__",
    ".cache",
    ".pytest_cache",
    "*.egg-info",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOPPED_EXIT_CODE = 3
COMMANDS = ("tune", "train")


@dataclass(frozen=True)
class JobPlan:
    """One ``sr-tune`` command as a Ray job."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def _inside(path: Path, working_dir: Path, what: str, problems: list[str]) -> str:
    """``path`` relative to ``working_dir`` (the form the job finds it by); a problem when it lies outside."""
    resolved = path.resolve()
    if not resolved.is_relative_to(working_dir):
        problems.append(
            f"{what} {path} is outside the working directory {working_dir}, the folder shipped to the cluster "
            f"(run from the project folder or pass --working-dir)"
        )
        return str(path)
    return str(resolved.relative_to(working_dir))


def plan_job(
    command: Sequence[str],
    *,
    working_dir: Path,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> JobPlan:
    """Check ``command`` (``tune STUDY [options]`` / ``train CONFIG [options]``) here and turn it into a job.
    Raises ``ConfigError`` listing every problem."""
    from sr_tune.cli import build_parser
    from sr_tune.config import load_config
    from sr_tune.storage import storage_problem
    from sr_tune.study import load_study

    if not command or command[0] not in COMMANDS:
        raise ConfigError([f"the job's command must be one of: {', '.join(COMMANDS)} (got {' '.join(command)!r})"])
    args = build_parser().parse_args(list(command))
    working_dir = working_dir.resolve()
    problems: list[str] = []
    if storage and (problem := storage_problem(storage)):
        problems.append(f"--storage {storage!r} {problem}")
    if command[0] == "tune":
        study = load_study(args.study)
        name = study.name
        shipped = _inside(Path(args.study), working_dir, "the study", problems)
        _inside(study.base_path, working_dir, "its base config", problems)
        arguments = [shipped, *command[2:]]
    else:
        config = load_config(args.config, args.overrides)
        name = config.run_name
        arguments = [_inside(Path(args.config), working_dir, "the config", problems), *command[2:]]
    if problems:
        raise ConfigError(problems, "sr-tune submit")
    if storage and command[0] == "tune":
        arguments += ["--storage", storage]
    if tracking_uri:
        arguments += ["--tracking-uri", tracking_uri]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return JobPlan(
        submission_id=f"sr-tune-{command[0]}-{name}-{stamp}-{secrets.token_hex(2)}",
        entrypoint=" ".join(["python", "-m", "sr_tune", command[0], *map(shlex.quote, arguments)]),
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": JOB_EXCLUDES,
            "py_modules": [str(Path(sr_tune.__file__).parent)],
        },
        metadata={"sr_tune.command": command[0], "sr_tune.name": name},
    )


class ClusterError(Exception):
    """The cluster cannot be reached, or refused this client: one line for the user."""


def send_token_if_available() -> None:
    """Send the cluster's token when one is available here and the user has not chosen a mode: Ray's client
    sends none unless ``RAY_AUTH_MODE=token``. Must run before anything imports Ray, which reads the mode once."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str) -> Any:
    """A ``JobSubmissionClient`` of the cluster whose dashboard is at ``address`` (``http://HEAD:8265``); call
    ``send_token_if_available`` first."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise ClusterError(_auth_problem(address, str(error))) from None
    except ConnectionError:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} (is the cluster up, and is this its dashboard "
            f"address, port 8265 by default?)"
        ) from None


def _auth_problem(address: str, message: str) -> str:
    if message.startswith("Authentication failed"):  # HTTP 403: a token, not this cluster's
        return (
            f"the Ray cluster at {address} refused the token (not this cluster's): set RAY_AUTH_TOKEN, or "
            f"RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, to the token the cluster was started with"
        )
    return (
        f"the Ray cluster at {address} requires a token and none was sent: set RAY_AUTH_TOKEN, or "
        f"RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, to the token the cluster was started with"
    )


def jobs_call(function: Any, *args: Any) -> Any:
    """A Jobs API call; the server's refusal (an unknown job id, ...) as one line instead of a traceback."""
    try:
        return function(*args)
    except RuntimeError as error:
        raise ClusterError(str(error).strip().rstrip(".")) from None


def dashboard_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def submit(client: Any, plan: JobPlan) -> str:
    try:
        return client.submit_job(
            entrypoint=plan.entrypoint,
            submission_id=plan.submission_id,
            runtime_env=plan.runtime_env,
            metadata=plan.metadata,
        )
    except RuntimeError as error:  # Ray's answer to a refused request: the HTTP status and the server's text
        raise ClusterError(f"the cluster refused the job: {error}") from None


def follow(client: Any, job_id: str, out: IO[str]) -> None:
    """Copy the job's log to ``out`` until the job ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


def wait(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    """The job's ``JobInfo`` once it has ended (its log can end a moment before its status does)."""
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        time.sleep(poll_s)


def exit_code(info: Any) -> int:
    """0 SUCCEEDED; FAILED: the command's own exit code (2: its input was refused), else 1; STOPPED: 3."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return STOPPED_EXIT_CODE
    return info.driver_exit_code or 1


def ended_line(info: Any) -> str:
    line = f"job {info.submission_id} {info.status}"
    if str(info.status) != "SUCCEEDED" and info.message:
        line += f": {info.message}"
    return line


def job_rows(jobs: Sequence[Any]) -> list[str]:
    """``sr-tune jobs list``: newest first."""
    rows = [f"{'submission id':<52}{'status':<11}{'started (UTC)':<21}{'took':>8}  entrypoint"]
    for job in sorted(jobs, key=lambda job: job.start_time or 0, reverse=True):
        started = (
            datetime.fromtimestamp(job.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else ""
        )
        took = f"{(job.end_time - job.start_time) / 1000:.0f}s" if job.start_time and job.end_time else ""
        rows.append(
            f"{job.submission_id or job.job_id:<52}{str(job.status):<11}{started:<21}{took:>8}  {job.entrypoint}"
        )
    return rows
