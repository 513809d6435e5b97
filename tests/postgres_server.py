"""A real PostgreSQL server for tests: Debian's binaries, a throwaway cluster in a temp folder.

The cluster is made with `initdb` (trust authentication, one superuser `tuneline`), listens on a
unix socket in its folder and on a loopback port chosen by the OS, and is stopped and removed at
the end. PostgreSQL refuses to run as root: under root the server runs as the `postgres` user
(Debian's package creates it) through `setpriv`, and the folder belongs to that user. Without the
binaries the fixture skips, saying how to install them (.ci/run does).

Use it through the session-scoped `postgres` pytest fixture (registered in tests/conftest.py), or
as a context manager:

    from postgres_server import postgres_server

    def test_something(postgres):
        url = postgres.create_database("mlflow")             # postgresql://tuneline@127.0.0.1:PORT/mlflow
        prefect_url = postgres.url("prefect", driver="asyncpg")  # postgresql+asyncpg://...
        rows = postgres.query("mlflow", "SELECT name FROM registered_models")

`PostgresServer` has `host`, `port`, `socket_dir`, `user`, `url(database, driver=None)`,
`create_database(name)` (a fresh database; an existing one is dropped first) and
`query(database, sql, *params)` (rows as tuples).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "tuneline"
RUN_AS = "postgres"  # the unprivileged user the server runs as when the tests run as root
INSTALL_HINT = "install Debian's package: apt-get install postgresql (.ci/run does)"
# A throwaway cluster: durability off, small memory, no background noise.
SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB"


def find_bindir() -> Path | None:
    """The folder of pg_ctl and initdb: on PATH, or the newest under /usr/lib/postgresql/*/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: where it listens and how to reach its databases."""

    host: str
    port: int
    socket_dir: Path
    user: str = SUPERUSER

    def url(self, database: str, driver: str | None = None) -> str:
        """A SQLAlchemy URL of `database` over TCP (`driver`: psycopg2, asyncpg; None: the default)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=database)
        connection.autocommit = True
        return connection

    def create_database(self, name: str) -> str:
        """A fresh, empty database `name` (dropped first if it exists); its URL."""
        with contextlib.closing(self.connect()) as connection, connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str, *params) -> list[tuple]:
        """The rows of one query against `database`."""
        with contextlib.closing(self.connect(database)) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()


def as_server_user(command: list[str]) -> list[str]:
    """`command` run as the unprivileged server user when this process is root."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", "--", *command]


def server_user_or_skip() -> None:
    """Skip when running as root without the `postgres` user to run the server as."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        pytest.skip(f"PostgreSQL cannot run as root and there is no {RUN_AS!r} user; {INSTALL_HINT}")


@contextlib.contextmanager
def postgres_server(timeout: int = 60) -> Iterator[PostgresServer]:
    """Start a cluster in a temp folder (skipping when PostgreSQL is not installed); stop it after."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")
    server_user_or_skip()
    root = Path(tempfile.mkdtemp(prefix="tuneline-pg-"))  # not under pytest's root-only tmp folders
    if os.geteuid() == 0:
        user = pwd.getpwnam(RUN_AS)
        os.chown(root, user.pw_uid, user.pw_gid)
    data = root / "data"
    run = [str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            as_server_user(
                [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"]
                + ["--no-sync", "--no-instructions"]
            ),
            check=True,
            capture_output=True,
            cwd=root,  # the server user may not enter the caller's folder
            timeout=timeout,
        )
        port = free_port()
        options = f"-h 127.0.0.1 -p {port} -k {root} {SETTINGS}"
        subprocess.run(
            as_server_user(
                [*run, "-l", str(root / "server.log"), "-o", options, "-w", "-t", str(timeout), "start"]
            ),
            check=True,
            capture_output=True,
            cwd=root,
            timeout=timeout + 10,
        )
    except subprocess.CalledProcessError as error:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {error.stderr.decode()}{log}") from None
    try:
        yield PostgresServer("127.0.0.1", port, root)
    finally:
        subprocess.run(
            as_server_user([*run, "-m", "immediate", "-w", "stop"]), capture_output=True, cwd=root, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the whole session (skips with the reason when it is not installed)."""
    with postgres_server() as server:
        yield server
