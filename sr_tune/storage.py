"""Where a sweep's output lives: a local folder or any ``pyarrow.fs`` URI.

A sweep writes everything it keeps (Tune's experiment, each trial's Ray Train storage, the checkpoints,
the state ``--resume`` reads) under one root. On one machine that is a folder; on a cluster it is object
storage that every node reaches (``s3://bucket/prefix``, ``gs://bucket/prefix``; S3-compatible stores
with ``?endpoint_override=host:port&scheme=http``), so no node needs to see another node's disk.
Credentials come from each node's environment (``AWS_*``, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``),
never from this URI: it is logged and passed to every trial.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from sr_tune.credentials import credential_problem

STORAGE_ENV = "SR_TUNE_STORAGE"


# The URI schemes pyarrow.fs opens; a sweep on a cluster needs one that every node reaches.
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_uri(location: str) -> bool:
    return "://" in location


def storage_problem(location: str) -> str | None:
    """Why ``location`` cannot be a storage root (None when it can); no request is made."""
    if not is_uri(location):
        return None
    if problem := credential_problem(location):
        return problem
    scheme = location.split("://", 1)[0]
    if scheme not in SCHEMES:
        return f"has scheme {scheme!r}, which pyarrow.fs does not open (use a folder or one of: {', '.join(SCHEMES)})"
    if not location.split("://", 1)[1].split("?", 1)[0].strip("/"):
        return f"names no bucket or folder (e.g. {scheme}://bucket/prefix)"
    return None


# A remote store that does not answer is found in seconds, before anything starts: pyarrow retries an
# unreachable S3 endpoint for about 20 s and waits on one that accepts and never answers for as long as it
# stays open, and a thread stuck there also holds up the process's exit. So the one request is made in a child
# process, killed at the deadline.
REACH_TIMEOUT_S = 10.0
_PROBE = """
import sys
import pyarrow.fs as pafs
filesystem, path = pafs.FileSystem.from_uri(sys.stdin.read())
print(filesystem.get_file_info(path).type.name)
"""


def probe(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> str:
    """What ``uri`` names on its store (``NotFound``, ``File`` or ``Directory``), asked with one request in a
    child process; raises ``ConnectionError`` (one line naming ``uri``) when the store does not answer within
    ``timeout_s`` or refuses. Credentials come from the environment, as for every other request."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], input=uri, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise ConnectionError(
            f"{uri} cannot be reached: no answer in {timeout_s:g} s (check the endpoint and the network)"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.strip().splitlines() if line.strip()]
        raise ConnectionError(f"{uri} cannot be reached: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout.strip()


def reach_problem(location: str) -> str | None:
    """Why a remote storage root cannot be used from here (None when it answers, or is a local folder)."""
    if not is_uri(location) or location.startswith("file://"):
        return None
    try:
        probe(location)
    except ConnectionError as error:
        return str(error).removeprefix(location).strip()
    return None


def filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    """A ``pyarrow.fs`` filesystem and the path on it for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


@dataclass(frozen=True)
class Storage:
    """A storage root: ``uri`` is an absolute local folder or a URI (its query kept for every child)."""

    uri: str

    @classmethod
    def at(cls, location: str) -> Storage:
        return cls(location if is_uri(location) else str(Path(location).expanduser().resolve()))

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}  # the filesystem is opened again where the object lands

    @property
    def remote(self) -> bool:
        return is_uri(self.uri) and not self.uri.startswith("file://")

    @cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        return filesystem_and_path(self.uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._resolved[0]

    def uri_of(self, name: str) -> str:
        """The URI (local: the path) of ``name`` under the root, for Ray's ``storage_path`` and ``Tuner.restore``."""
        if not is_uri(self.uri):
            return str(Path(self.uri) / name)
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))

    def path_of(self, name: str) -> str:
        """The path of ``name`` on :attr:`filesystem`, the form Ray's results and checkpoints carry."""
        return f"{self._resolved[1].rstrip('/')}/{name}"

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def read_text(self, path: str) -> str:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, path: str, text: str) -> None:
        """Written whole or not at all: object stores publish an object on close; a local file is renamed
        into place."""
        directory = path.rsplit("/", 1)[0]
        self.filesystem.create_dir(directory, recursive=True)
        if self.remote:
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(text.encode())
            return
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".partial") as partial:
            partial.write(text)
        os.replace(partial.name, path)

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.filesystem.delete_dir(path)

    def list_files(self, path: str) -> list[str]:
        """Every file under ``path``, recursively (empty when it does not exist)."""
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        except FileNotFoundError:
            return []
        return sorted(info.path for info in infos if info.type == pafs.FileType.File)

    @contextmanager
    def local_copy(self, path: str) -> Iterator[Path]:
        """``path`` (a folder on this storage) as a local folder: itself when local, else downloaded."""
        if not self.remote:
            yield Path(path)
            return
        root = path.rstrip("/")
        with tempfile.TemporaryDirectory(prefix="sr_tune-") as scratch:
            target = Path(scratch) / root.rsplit("/", 1)[-1]
            # File by file: object stores often hold no folder entries, which pyarrow's copy_files needs.
            for source in self.list_files(root):
                local = target / source.removeprefix(root + "/")
                local.parent.mkdir(parents=True, exist_ok=True)
                with self.filesystem.open_input_stream(source) as stream, local.open("wb") as out:
                    shutil.copyfileobj(stream, out, length=1 << 20)
            if not target.is_dir():
                raise FileNotFoundError(f"{self.uri}: nothing under {path}")
            yield target


def scratch_dir(*parts: str) -> Path:
    """A node-local folder for files a remote-storage sweep needs only while it runs (the engine's working
    checkpoints, the console's log): nothing of the sweep lands in the project's output folder. Not named
    ``sr_tune``: ``python -m sr_tune`` started in the temp folder would import that folder as the package.

    The temp folder is shared by every user of the machine, so the root is this user's own
    (``sr-tune-scratch-<uid>``, mode 0700): refused when it is a link, another user's, or open to others,
    which is what another user would plant there to read or redirect what a sweep writes."""
    root = Path(tempfile.gettempdir(), f"sr-tune-scratch-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise FileExistsError(
            f"{root}: the scratch folder is a link or not a folder, another user's, or open to other users; "
            f"sr_tune keeps sweep files there only in a private folder of its own (remove it to let sr_tune make one)"
        )
    return root.joinpath(*parts)
