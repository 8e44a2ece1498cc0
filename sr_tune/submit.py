"""Jobs on a Ray cluster through the Ray Jobs API: ``sr-tune submit`` and ``sr-tune jobs``.

A job runs one ``sr-tune`` command (``tune STUDY`` or ``train CONFIG``) on the cluster's head node, where it
is the Ray driver of the sweep. What it needs travels with it in the job's ``runtime_env``:

- ``working_dir``: a private folder with copies of exactly what the command needs: the study, its base
  config, the data folders and checkpoint they name by a relative path, and ``--include`` paths; never a
  dotfile or a key or credential file (``.ssh/``, ``.aws/credentials``, ``.env``, ``.ray/auth_token``, ...).
  ``submit`` prints the list; ``--dry-run`` prints only that. The command runs from its unpacked copy.
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
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import sr_tune
from sr_tune.credentials import credential_problem
from sr_tune.errors import SrTuneError
from sr_tune.fields import ConfigError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOPPED_EXIT_CODE = 3
COMMANDS = ("tune", "train")
# Every request to the cluster gives up after this long without an answer (the connection, then each wait for
# data, not the whole call); SR_TUNE_REQUEST_TIMEOUT_S sets another. Submitting (the upload of the job's
# files, the job's start) may wait UPLOAD_WAITS times as long for the answer.
REQUEST_TIMEOUT_S = 10.0
UPLOAD_WAITS = 6


def request_timeout_s() -> float:
    return float(os.environ.get("SR_TUNE_REQUEST_TIMEOUT_S") or REQUEST_TIMEOUT_S)


# Never shipped, wherever they lie in what a job takes: dotfiles and folders (.ssh, .aws, .env, .ray,
# .git, .venv, ...), and files whose names say they hold a key or a credential.
_SECRET_NAMES = re.compile(
    r"(?i)^(\..*|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|.*\.(pem|key|p12|pfx|jks|keystore|kdbx|gpg|asc)"
    r"|credentials(\..*)?|.*secret.*|.*token.*|auth_token|netrc|_netrc|.*password.*)$"
)
# Outputs, stores and environments: a job writes its own outputs to the sweep's storage.
_NOT_SHIPPED = frozenset({"runs", "mlruns", "mlflow.db", "optuna.db", "__pycache__", "venv", "node_modules"})
MAX_SHIPPED_BYTES = 500 * 2**20  # about Ray's own limit for a working_dir (its gRPC message size, 512 MiB)


@dataclass(frozen=True)
class JobPlan:
    """One ``sr-tune`` command as a Ray job: ``files`` (relative to ``working_dir``) are all it ships."""

    submission_id: str
    entrypoint: str
    working_dir: Path
    files: tuple[str, ...]
    metadata: dict[str, str]
    left_behind: tuple[str, ...] = ()  # files of the named folders that look like secrets or link outside

    def describe(self) -> str:
        """What the job runs and ships, as ``submit`` prints it (``--dry-run`` prints only this)."""
        size = sum((self.working_dir / name).stat().st_size for name in self.files)
        lines = [f"job {self.submission_id}: {self.entrypoint}", f"  ships {len(self.files)} file(s), {size:,} bytes:"]
        lines += [f"    {name}" for name in self.files]
        if self.left_behind:
            lines.append(f"  leaves behind {len(self.left_behind)} file(s) that look like secrets or link outside:")
            lines += [f"    {name}" for name in self.left_behind]
        return "\n".join(lines)

    @contextmanager
    def runtime_env(self) -> Iterator[dict[str, Any]]:
        """The job's ``runtime_env``: a private folder holding copies of exactly ``files`` as its working_dir
        (removed afterwards: Ray has uploaded it by the time ``submit_job`` returns), and this ``sr_tune``."""
        with tempfile.TemporaryDirectory(prefix="sr-tune-job-") as staging:
            for name in self.files:
                (Path(staging) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.working_dir / name, Path(staging) / name, follow_symlinks=True)
            yield {
                "working_dir": staging,
                "py_modules": [str(Path(sr_tune.__file__).parent)],
                "excludes": ["__pycache__", "*.pyc"],
            }


def _inside(path: Path, working_dir: Path, what: str, problems: list[str]) -> str:
    """``path`` relative to ``working_dir`` (the form the job finds it by); a problem when it lies outside."""
    resolved = path.resolve()
    if not resolved.is_relative_to(working_dir):
        problems.append(
            f"{what} {path} is outside the working directory {working_dir}, the folder the job's files are taken "
            f"from (run from the project folder or pass --working-dir)"
        )
        return str(path)
    return str(resolved.relative_to(working_dir))


# What gives a file away as a key or credentials whatever its name: PEM private keys (OpenSSH, RSA, EC, PKCS#8)
# and the AWS shared-credentials format. Read from files small enough to be one (keys are kilobytes).
_SECRET_CONTENT = (b"PRIVATE KEY-----", b"aws_secret_access_key", b"aws_session_token")
_SNIFFED_BYTES = 1 << 20


def _secret_problem(file: Path, working_dir: Path) -> str | None:
    """Why ``file`` must not travel (None when it may): a secret's name (or a folder of one) on its way
    from ``working_dir``, a link out of ``working_dir``, or a key's or credentials' content."""
    relative = file.relative_to(working_dir)
    if any(_SECRET_NAMES.match(part) for part in relative.parts):
        return "dotfiles and key or credential files are never shipped"
    if not file.resolve().is_relative_to(working_dir):
        return f"it links to {file.resolve()}, outside the working directory"
    if file.is_file() and file.stat().st_size <= _SNIFFED_BYTES:
        content = file.read_bytes()
        if any(marker in content for marker in _SECRET_CONTENT):
            return "it holds a private key or cloud credentials"
    return None


def _shipped_files(paths: Sequence[Path], working_dir: Path, problems: list[str], left_behind: set[str]) -> list[str]:
    """The files under ``working_dir`` that ``paths`` (files or folders) name, relative to it: never a
    dotfile, a key or credential file (by name or content), a link out of the folder, an output folder or an
    environment; named directly, one is a problem, found inside a folder it stays behind (``left_behind``,
    outputs and environments aside)."""
    found: set[str] = set()
    for path in paths:
        relative = _inside(path, working_dir, "the included path", problems)
        resolved = working_dir / relative
        if not resolved.exists():
            problems.append(f"--include {path}: no such file or folder")
            continue
        if problem := _secret_problem(resolved, working_dir):
            problems.append(f"--include {path}: {problem}")
            continue
        files = [resolved] if resolved.is_file() else sorted(p for p in resolved.rglob("*") if p.is_file())
        for file in files:
            if any(part in _NOT_SHIPPED for part in file.relative_to(working_dir).parts):
                continue
            name = file.relative_to(working_dir).as_posix()
            (found if _secret_problem(file, working_dir) is None else left_behind).add(name)
    return sorted(found)


def _is_loopback(address: str) -> bool:
    host = (urlsplit(address).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_paths(config: Any, working_dir: Path) -> list[Path]:
    """The files and folders a training config names by a relative path that lies in the working dir: its
    data folders and the checkpoint it starts from. (Absolute paths and URIs are the cluster's own.)"""
    named = [config.data.train, config.data.val, config.training.init_from]
    return [
        working_dir / value
        for value in dict.fromkeys(named)
        if value
        and value != "sample"
        and "://" not in value
        and not Path(value).is_absolute()
        and (working_dir / value).exists()
    ]


@dataclass(frozen=True)
class JobCommand:
    """The ``sr-tune`` command a job runs, as the command line parsed it (``cli.job_command``)."""

    name: str  # tune | train
    path: str  # the study or the config
    overrides: tuple[str, ...]  # its section.key=value overrides
    arguments: tuple[str, ...]  # everything after ``path``, as given

    @property
    def words(self) -> list[str]:
        return [self.name, self.path, *self.arguments]


def plan_job(
    command: JobCommand,
    *,
    working_dir: Path,
    address: str,
    storage: str | None = None,
    tracking_uri: str | None = None,
    include: Sequence[Path] = (),
) -> JobPlan:
    """Check ``command`` (``tune STUDY [options]`` / ``train CONFIG [options]``) here and turn it into a job
    that ships the study, its base config, the files they name and ``include``: nothing else of
    ``working_dir``. Raises ``ConfigError`` listing every problem."""
    from sr_tune.config import load_config
    from sr_tune.storage import storage_problem
    from sr_tune.study import load_study

    if command.name not in COMMANDS:
        raise ConfigError([f"the job's command must be one of: {', '.join(COMMANDS)} (got {command.name!r})"])
    working_dir = working_dir.resolve()
    problems: list[str] = []
    if working_dir == Path.home().resolve() or working_dir == Path(working_dir.anchor):
        problems.append(
            f"--working-dir {working_dir} is your home folder or the file system's root: run from the project "
            f"folder, so that nothing else is near what a job takes"
        )
    for flag, value in (("--storage", storage), ("--tracking-uri", tracking_uri)):
        if value and (problem := storage_problem(value) if flag == "--storage" else credential_problem(value)):
            problems.append(f"{flag} {value!r} {problem}")
    if command.name == "tune":
        study = load_study(command.path, command.overrides)
        name, config = study.name, study.base_config
        shipped = _inside(Path(command.path), working_dir, "the study", problems)
        _inside(study.base_path, working_dir, "its base config", problems)
        arguments = [shipped, *command.arguments]
        paths = [Path(command.path), study.base_path]
        keeps_results = bool(storage or study.storage)
    else:
        config = load_config(command.path, command.overrides)
        name = config.run_name
        arguments = [_inside(Path(command.path), working_dir, "the config", problems), *command.arguments]
        paths = [Path(command.path)]
        keeps_results = Path(config.training.output_dir).is_absolute() or "://" in (
            config.distributed.storage_path or ""
        )
    tracked = not config.tracking.enabled or (tracking_uri or config.tracking.tracking_uri).startswith(
        ("http://", "https://", "databricks")
    )
    if not _is_loopback(address) and not (keeps_results and tracked):
        where = "--storage (or the study's storage:)" if command.name == "tune" else "an absolute training.output_dir"
        problems.append(
            f"the job's results would land in its temporary working directory on {address} and vanish with it: "
            f"give {where} and --tracking-uri (a tracking server), or submit to a local cluster"
        )
    # The study and configs are shipped as named (they loaded as YAML configs); what they and --include name
    # only without dotfiles, keys and credential files.
    required = [
        _inside(path, working_dir, "the file", []) for path in paths if path.resolve().is_relative_to(working_dir)
    ]
    left_behind: set[str] = set()
    named = [*_local_paths(config, working_dir), *include]
    files = sorted({*required, *_shipped_files(named, working_dir, problems, left_behind)})
    size = sum((working_dir / file).stat().st_size for file in files)
    if size > MAX_SHIPPED_BYTES:
        problems.append(
            f"the job would ship {size / 2**20:.0f} MiB (over the 500 MiB Ray takes): put data in storage "
            f"(`sr-tune prepare DIR s3://...`) and name it by URI"
        )
    if problems:
        raise ConfigError(problems, "sr-tune submit")
    if storage and command.name == "tune":
        arguments += ["--storage", storage]
    if tracking_uri:
        arguments += ["--tracking-uri", tracking_uri]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return JobPlan(
        submission_id=f"sr-tune-{command.name}-{name}-{stamp}-{secrets.token_hex(2)}",
        entrypoint=" ".join(["python", "-m", "sr_tune", command.name, *map(shlex.quote, arguments)]),
        working_dir=working_dir,
        files=tuple(files),
        metadata={"sr_tune.command": command.name, "sr_tune.name": name},
        left_behind=tuple(sorted(left_behind)),
    )


class ClusterError(SrTuneError):
    """The cluster cannot be reached, or refused this client: one line for the user."""

    exit_code = 1


def _token_available() -> bool:
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(token_file).is_file()


def send_token_if_available(address: str, *, insecure: bool = False) -> None:
    """Send the cluster's token when one is available here and the user has not chosen a mode: Ray's client
    sends none unless ``RAY_AUTH_MODE=token``. Must run before anything imports Ray, which reads the mode once.

    The token goes in clear only to this machine (a loopback address, where an SSH or kubectl port-forward
    also lands) or over ``https://``; to another host over ``http://`` only with ``insecure``."""
    mode = os.environ.get("RAY_AUTH_MODE")
    sends = mode == "token" or (mode is None and _token_available())
    if sends and urlsplit(address).scheme == "http" and not _is_loopback(address) and not insecure:
        raise ConfigError(
            [
                f"--address {address}: the cluster's token would cross the network in clear (http:// to another "
                f"host); use https://, an SSH or kubectl port-forward to 127.0.0.1, or --insecure on a network "
                f"you trust"
            ],
            "command line",
        )
    if mode is None and sends:
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str) -> Any:
    """A ``JobSubmissionClient`` of the cluster whose dashboard is at ``address`` (``http://HEAD:8265``); call
    ``send_token_if_available`` first. Every request it makes gives up after ``request_timeout_s()`` without
    an answer: Ray's client sets no timeout, so one is added where it makes its requests."""
    import requests
    from ray.exceptions import AuthenticationError

    from sr_tune.local_ray import bounded_job_client

    def timeouts(method: str) -> tuple[float, float]:
        waits = UPLOAD_WAITS if method in ("PUT", "POST") else 1  # an upload, a job's start
        return request_timeout_s(), request_timeout_s() * waits

    try:
        return bounded_job_client(address, timeouts)
    except AuthenticationError as error:
        raise ClusterError(_auth_problem(address, str(error))) from None
    except ConnectionError:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} (is the cluster up, and is this its dashboard "
            f"address, port 8265 by default?)"
        ) from None
    except (requests.RequestException, RuntimeError, TimeoutError, ValueError, KeyError) as error:
        raise ClusterError(_not_a_dashboard(address, error)) from None  # something else answered there


def _not_a_dashboard(address: str, error: BaseException) -> str:
    import requests

    if isinstance(error, requests.Timeout | TimeoutError):
        return f"the Ray dashboard at {address} did not answer within {request_timeout_s():g} s"
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"{address} answered HTTP {error.response.status_code}: is this the cluster's dashboard (port 8265)?"
    if isinstance(error, RuntimeError) and "404" in str(error):
        return f"{address} answered HTTP 404: is this the cluster's dashboard (port 8265)?"
    if isinstance(error, ValueError | KeyError):  # an HTML page or other JSON: r.json()["ray_version"] failed
        return f"{address} answered, but not as a Ray dashboard does: is this the cluster's dashboard (port 8265)?"
    return f"the Ray dashboard at {address} failed: {last_line(str(error)) or type(error).__name__}"


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
    """A Jobs API call; the server's refusal (an unknown job id, ...), a timeout or an answer that is not
    the Jobs API's as one line instead of a traceback."""
    import requests

    try:
        return function(*args)
    except RuntimeError as error:
        raise ClusterError(last_line(str(error)).rstrip(".")) from None
    except (requests.RequestException, TimeoutError, ValueError, KeyError) as error:
        address = getattr(function, "__self__", None)
        raise ClusterError(_not_a_dashboard(getattr(address, "_address", "the cluster"), error)) from None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def dashboard_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def submit(client: Any, plan: JobPlan) -> str:
    with plan.runtime_env() as runtime_env:
        try:
            return jobs_call(
                lambda: client.submit_job(
                    entrypoint=plan.entrypoint,
                    submission_id=plan.submission_id,
                    runtime_env=runtime_env,
                    metadata=plan.metadata,
                )
            )
        except ClusterError as error:  # Ray's answer to a refused request: the HTTP status and the server's text
            raise ClusterError(f"the cluster refused the job: {error}") from None


def follow(client: Any, job_id: str, out: IO[str]) -> None:
    """Copy the job's log to ``out`` until the job ends (an unknown job: ``ClusterError``)."""
    jobs_call(client.get_job_info, job_id)  # one bounded request first: the job exists and the server answers

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as error:  # the stream closed before the job ended, or the server refused it
        raise ClusterError(f"following job {job_id}: {last_line(str(error))}") from None


def wait(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    """The job's ``JobInfo`` once it has ended (its log can end a moment before its status does)."""
    while True:
        info = jobs_call(client.get_job_info, job_id)
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
