"""Real servers for the cluster tests, each a child process on 127.0.0.1 at picked free ports, stopped by PID
(its whole process group) when its fixture ends, also on failure: SeaweedFS (an S3 store), an MLflow
tracking server with its artifacts on that store, and a Ray cluster of two nodes with token auth."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while picked, so none repeats)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@dataclass
class Service:
    """A started server: its process group is stopped by ``stop`` (SIGTERM, then SIGKILL)."""

    name: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        started = time.monotonic()
        try:
            self._stop()
        finally:
            print(f"stopped {self.name} in {time.monotonic() - started:.1f} s", file=sys.stderr)

    def kill(self) -> None:
        """SIGKILL to its whole process group at once, as when its machine dies."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def _stop(self) -> None:
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""


def start(name: str, command: list[str], log: Path, env: dict[str, str] | None = None) -> Service:
    handle = log.open("w")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log.parent
    )
    return Service(name, process, log)


def wait_until(ready: Callable[[], bool], service: Service, timeout_s: float) -> None:
    """Poll ``ready`` until it holds; fail with the service's log when it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.tail()}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{service.name} not ready after {timeout_s:.0f} s:\n{service.tail()}")


def http_ok(url: str, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
        return response.status == 200


@dataclass
class S3Store:
    endpoint: str  # 127.0.0.1:PORT
    access_key: str
    secret_key: str
    service: Service

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            allow_bucket_creation=True,
        )

    def uri(self, path: str) -> str:
        """``s3://path`` on this store; credentials come from the environment (``env``)."""
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def start_seaweedfs(folder: Path) -> S3Store:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) with one identity."""
    folder.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "sr-tune-test", secrets.token_hex(16)
    identity = {"name": "sr_tune", "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}
    config = {"identities": [{**identity, "actions": ["Admin", "Read", "Write", "List"]}]}
    (folder / "s3.json").write_text(json.dumps(config))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        str(BIN / "weed"),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={folder}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={folder / 's3.json'}",
        "-iam=false",
    ]
    service = start("seaweedfs", command, folder / "weed.log")
    store = S3Store(f"127.0.0.1:{s3}", access_key, secret_key, service)

    def bucket_works() -> bool:
        fs = store.filesystem()
        fs.create_dir("probe")
        with fs.open_output_stream("probe/ready") as stream:
            stream.write(b"ok")
        return True

    try:
        wait_until(bucket_works, service, timeout_s=60)
    except BaseException:
        service.stop()
        raise
    return store


def start_mlflow_server(
    folder: Path, store: S3Store | None = None, bucket: str = "", port: int | None = None
) -> tuple[str, Service]:
    """``mlflow server`` on 127.0.0.1 (``port``: a restart at the same address): SQLite backend in ``folder``,
    artifacts served from ``s3://bucket/mlflow`` of ``store``, or from ``folder`` without one."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # its job runner: seven more processes nothing here uses
    }
    artifacts = f"s3://{bucket}/mlflow" if store else (folder / "artifacts").as_uri()
    if store is not None:
        store.filesystem().create_dir(bucket)
        env.update(store.env(), MLFLOW_S3_ENDPOINT_URL=f"http://{store.endpoint}")
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
    ]
    service = start("mlflow server", command, folder / "mlflow-server.log", env)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), service, timeout_s=90)
    except BaseException:
        service.stop()
        raise
    return uri, service


@dataclass
class RayCluster:
    address: str  # the dashboard, for the Jobs API: http://127.0.0.1:PORT
    gcs_address: str
    token: str
    env: dict[str, str]  # what the nodes run with (and a client with the right token)
    nodes: list[Service] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        # `ray stop` would remove the head's note of "the local cluster"; killed by PID, the nodes leave it.
        note = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        if note.is_file() and note.read_text().strip().endswith(":" + self.gcs_address.rsplit(":", 1)[1]):
            note.unlink()

    def temp_dir(self) -> str:
        """A node's own temporary root. Nodes on one machine would otherwise share one session folder, and
        one node's runtime-env agent deletes a job's working directory that another node's job still runs
        in. Short (under /tmp): Ray's socket paths must fit in 107 characters."""
        folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.temp_dirs.append(folder)
        return str(folder)


def _node_ports() -> list[str]:
    """A node's own ports, picked: two raylets on one machine would otherwise both take Ray's defaults."""
    manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


def start_ray_cluster(folder: Path, extra_env: dict[str, str], *, second_node: bool = True) -> RayCluster:
    """A head (``node_a``) and, unless not ``second_node``, a second node (``node_b``, its own raylet), one
    CPU each, token auth on."""
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
        **extra_env,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dashboard_port, client_port = free_ports(3)
    ray = str(BIN / "ray")
    cluster = RayCluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", token, env)
    head = start(
        "ray head",
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}",
            "--num-cpus=1",
            '--resources={"node_a": 1}',
            f"--temp-dir={cluster.temp_dir()}",
            *_node_ports(),
        ],
        folder / "head.log",
        env,
    )
    cluster.nodes.append(head)
    try:
        wait_until(lambda: http_ok(f"{cluster.address}/api/version", token), head, timeout_s=120)
        if not second_node:
            return cluster
        worker = start(
            "ray node",
            [
                ray,
                "start",
                "--block",
                f"--address={cluster.gcs_address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                '--resources={"node_b": 1}',
                f"--temp-dir={cluster.temp_dir()}",
                *_node_ports(),
            ],
            folder / "node.log",
            env,
        )
        cluster.nodes.append(worker)
        wait_until(lambda: _alive_nodes(cluster) == 2, worker, timeout_s=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _alive_nodes(cluster: RayCluster) -> int:
    request = urllib.request.Request(
        f"{cluster.address}/nodes?view=summary", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        summary = json.loads(response.read())["data"]["summary"]
    return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")
