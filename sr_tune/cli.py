"""``sr-tune`` command line: parse arguments -> typed config -> call one function."""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from sr_tune import preflight
from sr_tune.config import TrainConfig, describe_fields, load_config
from sr_tune.credentials import credential_problem, redact
from sr_tune.errors import InputError, SrTuneError
from sr_tune.fields import ConfigError
from sr_tune.image_commands import add_image_commands
from sr_tune.models import SUPPORTED_SCALES
from sr_tune.results import learned_columns
from sr_tune.submit import COMMANDS, JobCommand

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _count_parameters(name: str, scale: int) -> int:
    from sr_tune.models import create_model

    return sum(p.numel() for p in create_model(name, scale=scale).parameters())


def cmd_models(args: argparse.Namespace) -> int:
    from sr_tune.models import get_builder, list_models

    print(f"{'model':<16}{'channels':>9}{'params x2':>12}{'params x3':>12}{'params x4':>12}  description")
    for name in list_models():
        builder = get_builder(name)
        counts = [_count_parameters(name, s) for s in SUPPORTED_SCALES]
        channels = inspect.signature(builder).parameters["in_channels"].default
        summary = builder.__doc__.strip().splitlines()[0] if builder.__doc__ else ""
        print(f"{name:<16}{channels:>9}" + "".join(f"{c:>12,}" for c in counts) + f"  {summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        for key, type_name, default, help_text in describe_fields():
            print(f"{key:<32} {type_name:<38} default {default!r:<22} {help_text}")
        return 0
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _tracking_uri(config: TrainConfig, override: str | None) -> str | None:
    """The run's MLflow store, resolved here once (``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then the
    config) and, for a server, checked to answer before anything starts; a SQLite store copied or moved
    here made to keep its artifacts beside it. None when tracking is off."""
    from sr_tune.tracking import check_tracking_server, follow_moved_store, resolve_tracking_uri

    if not config.tracking.enabled:
        return None
    uri = resolve_tracking_uri(config.tracking.tracking_uri, override)
    if problem := credential_problem(uri):
        raise ConfigError([f"the tracking URI {uri!r} {problem}"], "--tracking-uri / MLFLOW_TRACKING_URI / config")
    check_tracking_server(uri)
    if moved := follow_moved_store(uri, config.tracking.experiment):
        print(moved, flush=True)
    return uri


def _tracking_client(uri: str | None) -> MlflowClient | None:
    from mlflow import MlflowClient

    return MlflowClient(uri) if uri else None


def cmd_train(args: argparse.Namespace) -> int:
    from sr_tune.checkpoint import has_checkpoint, load_checkpoint
    from sr_tune.distributed import earlier_run_files, fit

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:  # with the data's problems, in the same round
        raise ConfigError(
            [*error.problems, *preflight.raw_data_problems(args.config, args.overrides)], error.source
        ) from None
    # Every problem in one round, before a run, a folder or the MLflow store exists.
    problems = preflight.data_problems(config)
    if config.training.init_from:  # read now: a missing or corrupt one is refused before a run exists
        try:
            load_checkpoint(config.training.init_from)
        except (InputError, FileNotFoundError) as error:
            problems.append(f"training.init_from: {error}")
    last = Path(config.training.output_dir) / config.run_name / "last"
    if args.resume and not has_checkpoint(last):
        problems.append(f"--resume: no checkpoint to continue from at {last} (leave out --resume to start)")
    if not args.resume and (earlier := earlier_run_files(config)):
        again = shlex.join(["sr-tune", "train", args.config, *args.overrides])
        problems.append(
            f"run {config.run_name!r} exists ({', '.join(earlier)}): a new run would overwrite or resume it; "
            f"continue it with `{again} --resume`, or start another with `{again} tracking.run_name=NEW_NAME`"
        )
    if problems:
        raise ConfigError(problems, args.config)
    if args.resume and (finished := _finished_run(config, last)):
        print(finished)
        return 0
    # The console shows the run's own lines: MLflow's store set-up and Ray Train's local-mode and report notes
    # are INFO of theirs (their warnings and errors still show).
    for library in ("mlflow", "ray.train"):
        logging.getLogger(library).setLevel(logging.WARNING)
    client = _tracking_client(_tracking_uri(config, args.tracking_uri))
    workers = config.distributed.num_workers
    where = f"{workers} Ray Train worker(s)" if workers else "this process (Ray local mode)"
    print(
        f"training {config.model.name} x{config.model.scale} on {config.data.train!r} "
        f"({config.data.color}, batch {config.data.batch_size}, {config.training.steps} steps) in {where}",
        flush=True,
    )
    try:
        result = fit(config, config_path=args.config, resume=args.resume, client=client)
    except KeyboardInterrupt:
        kept = f"its last checkpoint, {last}, is intact" if has_checkpoint(last) else "no checkpoint was written yet"
        again = shlex.join(["sr-tune", "train", args.config, *args.overrides, "--resume"])
        raise Interrupted(f"training of {config.run_name} stopped: {kept}; continue with: {again}") from None
    metrics = result.metrics
    scores = (
        f"PSNR-Y {metrics['val_psnr']:.2f} dB, {metrics['psnr_gain']:+.2f} dB over bicubic; "
        if "val_psnr" in metrics
        else ""
    )
    print(f"done: {scores}checkpoints {Path(config.training.output_dir) / config.run_name}/{{last,best}}")
    if learned := learned_columns(metrics):
        print("Delta-STN ended at: " + ", ".join(f"{key.removeprefix('hp_')} {metrics[key]:.3g}" for key in learned))
    if workers:
        print(f"Ray checkpoint: {result.checkpoint}")
    if result.run_id and client is not None:
        experiment = client.get_run(result.run_id).info.experiment_id
        print(
            f"MLflow run {result.run_id}; browse with: mlflow ui --backend-store-uri {client.tracking_uri}\n"
            f"  the run: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{result.run_id}"
            f"?workflowType=machine_learning"
        )
    return 0


def _finished_run(config: TrainConfig, last: Path) -> str | None:
    """What to say of a run whose last checkpoint has reached ``training.steps`` (None while it has not): it
    is shown, not resumed, and nothing is logged again."""
    from sr_tune.checkpoint import has_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(last)
    if checkpoint.step < config.training.steps:
        return None
    metrics, folder = checkpoint.metrics, last.parent
    lines = [
        f"run {config.run_name} is finished (step {checkpoint.step} of {config.training.steps}); nothing to resume"
    ]
    if "val_psnr" in metrics:
        lines.append(
            f"  last: PSNR-Y {metrics['val_psnr']:.2f} dB, {metrics.get('psnr_gain', 0.0):+.2f} dB over bicubic"
        )
    if has_checkpoint(folder / "best"):
        best = load_checkpoint(folder / "best")
        if "val_psnr" in best.metrics:
            lines.append(f"  best: PSNR-Y {best.metrics['val_psnr']:.2f} dB at step {best.step}")
    lines.append(f"  checkpoints {folder}/{{last,best}}; raise training.steps to train on")
    if run_id := checkpoint.run.mlflow_run_id:
        lines.append(f"  MLflow run {run_id}")
    return "\n".join(lines)


def cmd_tune(args: argparse.Namespace) -> int:
    from sr_tune.console import SweepView, ray_output_to
    from sr_tune.distributed import shutdown_ray
    from sr_tune.storage import STORAGE_ENV, reach_problem
    from sr_tune.study import load_study
    from sr_tune.summary import sweep_table
    from sr_tune.sweep.driver import run_sweep
    from sr_tune.sweep.layout import remove_sweep, sweep_paths
    from sr_tune.sweep.tracker import trials_page

    # Every problem in one round: the study's own, its data's, the storage's; nothing is created before.
    named, storage = next(
        (
            (name, value)
            for name, value in (("--storage", args.storage), (STORAGE_ENV, os.environ.get(STORAGE_ENV)))
            if value
        ),
        ("storage", None),
    )
    storage_problems = preflight.storage_problems(named, storage) if storage else []
    study = load_study(args.study, args.overrides, base_checks=preflight.data_problems, extra_problems=storage_problems)
    if problems := preflight.resource_problems(study):
        raise ConfigError(problems, args.study)
    if not storage and study.storage and (problem := reach_problem(study.storage)):
        raise ConfigError([f"storage: {study.storage!r} {problem}"], args.study)
    uri = _tracking_uri(study.base_config, args.tracking_uri)
    paths = sweep_paths(study, uri, args.storage)
    if args.restart:  # everything checked: the earlier sweep goes, before this one's log opens
        for removed in remove_sweep(study, paths):
            print(f"removed {removed}")
    if args.verbose:  # Ray's and Tune's output on the console, the view as plain lines between it
        view = SweepView(study, sys.stdout, live=False)
        try:
            result = run_sweep(study, tracking_uri=uri, resume=args.resume, view=view, storage=args.storage)
        finally:
            shutdown_ray()
    else:
        print(f"Ray and Tune log to {paths.log} (--verbose shows them here)", flush=True)
        with ray_output_to(paths.log) as console:  # opening a new MLflow store logs its table creation there
            view = SweepView(study, console, live=console.isatty())
            try:
                result = run_sweep(study, tracking_uri=uri, resume=args.resume, view=view, storage=args.storage)
            finally:
                view.close()
                shutdown_ray()
    client = _tracking_client(uri)  # the store exists by now: opening it again takes milliseconds
    if result.unfinished:
        again = shlex.join(
            [
                "sr-tune",
                "tune",
                args.study,
                *args.overrides,
                "--resume",
                *(["--storage", args.storage] if args.storage else []),
            ]
        )
        raise Interrupted(
            f"sweep {study.name!r} stopped with {result.unfinished} trial(s) unfinished: its state is saved in "
            f"{result.experiment}; continue with: {again}"
        )
    print(sweep_table(study, result.trials, top=args.top, final=result.final))
    if result.importance is not None:
        print(result.importance.line(study.objective.metric))
    for warning in result.warnings:
        print(f"warning: {warning}")
    succeeded = [trial for trial in result.trials if study.objective.metric in trial.best]
    if result.parent_run_id and client is not None:
        version = result.model_version
        whose = "the final run's model" if result.final_registered else "best model"
        registered = f"; {whose} registered as sr_tune-{study.name} v{version}" if version else ""
        experiment = client.get_run(result.parent_run_id).info.experiment_id
        print(f"MLflow parent run {result.parent_run_id}{registered}")
        print(
            f"browse with: mlflow ui --backend-store-uri {client.tracking_uri}\n"
            f"  this sweep's trials: http://127.0.0.1:5000/{trials_page(experiment, result.parent_run_id)}"
        )
    if not succeeded:
        from sr_tune.tracking import last_line

        errors = sorted({last_line(trial.error or "ended before its first evaluation") for trial in result.trials})
        print(f"sr-tune: no trial of study {study.name!r} succeeded: {'; '.join(errors)}", file=sys.stderr)
        return 1
    return 0


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            ["--address: the cluster's dashboard address is needed, e.g. http://HEAD:8265"], "command line"
        )
    if problem := credential_problem(address):
        raise ConfigError([f"--address {address!r} {problem}"], "command line")
    return address


def job_command(words: Sequence[str]) -> JobCommand:
    """A job's ``tune STUDY ...`` / ``train CONFIG ...`` parsed as this command line would parse it."""
    if not words or words[0] not in COMMANDS:
        got = " ".join(words)
        raise ConfigError([f"the job's command must be one of: {', '.join(COMMANDS)} (got {got!r})"], "sr-tune submit")
    args = parse_command(list(words))
    path = args.study if words[0] == "tune" else args.config
    return JobCommand(words[0], path, tuple(args.overrides), tuple(words[2:]))


def cmd_submit(args: argparse.Namespace) -> int:
    from sr_tune import submit

    address = _address(args)
    plan = submit.plan_job(
        job_command(args.job[1:] if args.job[:1] == ["--"] else args.job),
        working_dir=Path(args.working_dir),
        address=address,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        include=[Path(path) for path in args.include],
    )
    if args.dry_run:
        print(plan.describe())
        return 0
    submit.send_token_if_available(address, insecure=args.insecure)
    client = submit.connect(address)
    job_id = submit.submit(client, plan)
    print(
        f"submitted {plan.describe()}\n  dashboard: {submit.dashboard_url(address, job_id)}",
        flush=True,
    )
    if args.no_wait:
        print(f"  follow with: sr-tune jobs logs {job_id} --follow --address {address}")
        return 0
    try:
        submit.follow(client, job_id, sys.stdout)
        info = submit.wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (sr-tune jobs stop {job_id} --address {address})")
        return 130
    print(submit.ended_line(info))
    return submit.exit_code(info)


def cmd_jobs(args: argparse.Namespace) -> int:
    from sr_tune import submit

    address = _address(args)
    submit.send_token_if_available(address, insecure=args.insecure)
    client = submit.connect(address)
    if args.action == "list":
        print("\n".join(submit.job_rows(submit.jobs_call(client.list_jobs))))
        return 0
    if not args.job_id:
        problem = f"jobs {args.action}: which job? (a submission id from `sr-tune jobs list`)"
        raise ConfigError([problem], "command line")
    if args.action == "logs":
        if args.follow:
            submit.follow(client, args.job_id, sys.stdout)
        else:
            print(submit.jobs_call(client.get_job_logs, args.job_id), end="")
        return 0
    if args.action == "stop":
        stopped = submit.jobs_call(client.stop_job, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'had already ended'}")
        return 0
    info = submit.jobs_call(client.get_job_info, args.job_id)
    if str(info.status) not in submit.TERMINAL:
        print(f"job {args.job_id} {info.status}")
        return 0
    print(submit.ended_line(info))
    return submit.exit_code(info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-tune", description="Train and tune super-resolution models.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list every model with its parameter count at x2/x3/x4")
    models.set_defaults(run=cmd_models)

    config = sub.add_parser("config", help="show a config resolved with overrides, or the key reference")
    config.add_argument("config", nargs="?", help="YAML file (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="section.key=value")
    config.add_argument("--reference", action="store_true", help="list every key, type, default and meaning")
    config.set_defaults(run=cmd_config)

    train = sub.add_parser("train", help="train one model from a YAML config (through Ray Train, logged to MLflow)")
    train.add_argument("config", help="YAML file, e.g. configs/smoke.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimizer.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--tracking-uri", help="MLflow store or server (wins over MLFLOW_TRACKING_URI and the config)")
    train.set_defaults(run=cmd_train)

    tune = sub.add_parser("tune", help="run a hyperparameter sweep from a study file (Ray Tune, logged to MLflow)")
    tune.add_argument("study", help="YAML study, e.g. search_spaces/quickstart.yaml")
    tune.add_argument(
        "overrides",
        nargs="*",
        help="key=value: the study's (budget.num_samples=4, resources.cpus_per_worker=1) or any training-config "
        "key of every trial (training.device=cpu)",
    )
    again = tune.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the study's interrupted sweep")
    again.add_argument(
        "--restart",
        action="store_true",
        help="remove the study's earlier sweep (its state, checkpoints, searcher, log; its MLflow runs stay) and "
        "start over",
    )
    tune.add_argument(
        "--storage", help="where the sweep's output lives: a folder or s3://, gs:// URI (wins over SR_TUNE_STORAGE)"
    )
    tune.add_argument("--tracking-uri", help="MLflow store or server (wins over MLFLOW_TRACKING_URI and the config)")
    tune.add_argument("--top", type=int, default=5, help="trials in the closing table (default 5)")
    tune.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output instead of the log file")
    tune.set_defaults(run=cmd_tune)

    add_image_commands(sub)

    submit = sub.add_parser(
        "submit",
        help="run `tune STUDY` or `train CONFIG` on a Ray cluster as a job (Ray Jobs API)",
        description="e.g. sr-tune submit --address http://127.0.0.1:8265 --storage s3://bucket/sweeps "
        "--tracking-uri https://mlflow.internal -- tune study.yaml",
    )
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--storage", help="the sweep's storage root on the cluster (s3://, gs:// or a shared folder)")
    submit.add_argument("--tracking-uri", help="the MLflow tracking server the job logs to (http://...)")
    submit.add_argument("--working-dir", default=".", help="the folder shipped with the job (default: this one)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following")
    submit.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="a file or folder under the working dir to ship too (repeatable; dotfiles and key files never travel)",
    )
    submit.add_argument("--dry-run", action="store_true", help="print what the job runs and ships; submit nothing")
    submit.add_argument(
        "--insecure", action="store_true", help="send the cluster's token over plain http:// to another host"
    )
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- tune STUDY.yaml [--resume] | -- train CONFIG.yaml")
    submit.set_defaults(run=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop the cluster's jobs")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    jobs.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jobs.add_argument(
        "--insecure", action="store_true", help="send the cluster's token over plain http:// to another host"
    )
    jobs.set_defaults(run=cmd_jobs)

    return parser


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command: the line says what stopped and how to continue."""


def _stop_signal_handler() -> list[int]:
    """SIGTERM stops a command as Ctrl-C does (Tune saves the sweep, a run is marked KILLED): it raises
    SIGINT, whose handler (Tune's during a sweep, else Python's KeyboardInterrupt) takes over. Returns the
    list that records it."""
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        if not callable(signal.getsignal(signal.SIGINT)):  # ignored: started in the background by a shell
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    return received


def parse_command(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides before or after the flags (``tune STUDY --resume
    budget.num_samples=2``): argparse alone takes a command's positionals in one run, before any flag."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command(argv)
    debug = bool(os.environ.get("SR_TUNE_DEBUG"))  # the full traceback of any error too, for a bug report
    terminated = _stop_signal_handler()
    try:
        return args.run(args)
    except BrokenPipeError:  # `sr-tune models | head`: the reader has gone, and wants no error line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes nowhere
        return 128 + signal.SIGPIPE
    except (Interrupted, KeyboardInterrupt) as stop:
        code, message = 128 + (signal.SIGTERM if terminated else signal.SIGINT), f"{args.command} interrupted"
        error, line = stop, f"\nsr-tune: {redact(str(stop)) or message}"  # 143 or 130, as a shell reports them
    except ConfigError as refused:
        code, error, line = 2, refused, f"sr-tune: invalid configuration: {redact(str(refused))}"
    except SrTuneError as refused:
        code, error, line = refused.exit_code, refused, f"sr-tune: {redact(str(refused))}"
    except (  # a file or folder the user named, or a store that does not answer: the OS's own words name it
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        NotADirectoryError,
        IsADirectoryError,
        ConnectionError,
    ) as refused:
        code, error, line = 2, refused, f"sr-tune: {redact(str(refused))}"
    except FloatingPointError as diverged:
        code, error, line = 1, diverged, f"sr-tune: training diverged: {diverged}"
    if debug:
        traceback.print_exception(error)
    print(line, file=sys.stderr)
    return code


def entry() -> NoReturn:
    """The ``sr-tune`` command: ``main``, then exit."""
    code = main()
    # The interpreter's exit runs garbage collections over every object torch, Ray and MLflow made, seconds
    # after a sweep; frozen, they are left to reference counting.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
