"""Addresses that answer wrongly or not at all: `sr-tune jobs` against a server that says 404, 500 or serves an
HTML page, or accepts and never answers; Ctrl-C while it waits; storage roots and data URIs nobody answers
at. Each is one line, a non-zero exit, within seconds, and nothing is created. The servers are real, on
picked loopback ports, stopped at the end."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..services import free_port
from .test_data_loss import SR_TUNE, refused, sr_tune
from .test_secrets import home_like


class _Answers(BaseHTTPRequestHandler):
    """Answers every GET by the path's first part: /404/..., /500/..., /html/..."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        kind = self.path.strip("/").split("/", 1)[0]
        status, body = {"404": (404, b"not here"), "500": (500, b"oops")}.get(kind, (200, b"<html>a login page</html>"))
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Silent:
    """A port that accepts connections and never answers; ``accepted`` is set at the first connection."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)
            self.accepted.set()

    def close(self) -> None:
        for connection in [*self.held, self.socket]:
            connection.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(
    ("kind", "said"),
    [("404", "answered HTTP 404"), ("500", "answered HTTP 500"), ("html", "not as a Ray dashboard does")],
)
def test_jobs_against_an_address_that_is_not_a_ray_dashboard_is_one_line(web: str, tmp_path: Path, kind, said):
    for action in (["list"], ["status", "some-job"], ["logs", "some-job", "--follow"]):
        result = sr_tune("jobs", *action, "--address", f"{web}/{kind}", cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert said in result.stderr and "Traceback" not in result.stderr


def test_jobs_against_a_server_that_never_answers_gives_up_in_seconds(silent: Silent, tmp_path: Path):
    started = time.monotonic()
    result = sr_tune(
        "jobs", "list", "--address", f"http://127.0.0.1:{silent.port}", cwd=tmp_path, SR_TUNE_REQUEST_TIMEOUT_S="2"
    )
    assert result.returncode == 1 and "did not answer within 2 s" in result.stderr and result.stderr.count("\n") == 1
    assert time.monotonic() - started < 60  # the bound is the 2 s timeout plus Python's and Ray's imports


def test_ctrl_c_while_jobs_waits_says_what_was_interrupted(silent: Silent, tmp_path: Path):
    process = subprocess.Popen(
        [*SR_TUNE, "jobs", "list", "--address", f"http://127.0.0.1:{silent.port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    try:
        assert silent.accepted.wait(60), "the command never connected"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and stderr.strip() == "sr-tune: jobs interrupted"


def test_unreachable_storage_and_data_uris_are_refused_in_seconds_with_nothing_created(silent: Silent, tmp_path: Path):
    project = home_like(tmp_path / "home") / "project"
    closed = f"s3://bucket/sweeps?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    hanging = f"s3://bucket/sweeps?endpoint_override=127.0.0.1:{silent.port}&scheme=http"
    for uri in (closed, hanging):
        started = time.monotonic()
        message = refused(
            sr_tune("tune", "study.yaml", "--storage", uri, cwd=project, AWS_EC2_METADATA_DISABLED="true")
        )
        assert "cannot be reached" in message and time.monotonic() - started < 60
    message = refused(sr_tune("prepare", "data/train", hanging, cwd=project, AWS_EC2_METADATA_DISABLED="true"))
    assert "no answer in 10 s" in message
    message = refused(
        sr_tune("tune", "study.yaml", cwd=project, SR_TUNE_STORAGE=closed, AWS_EC2_METADATA_DISABLED="true")
    )
    assert "SR_TUNE_STORAGE" in message and "cannot be reached" in message
    study = (project / "study.yaml").read_text()
    (project / "study.yaml").write_text(f"{study}storage: {closed}\n")
    message = refused(sr_tune("tune", "study.yaml", cwd=project, AWS_EC2_METADATA_DISABLED="true"))
    assert "storage: 's3://bucket/sweeps?" in message and "cannot be reached" in message
    assert sorted(p.name for p in project.iterdir()) == ["configs", "data", "notes.txt", "secrets", "study.yaml"]
