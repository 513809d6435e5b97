"""The project's local Prefect server: started when a run or `tuneline ui` needs one, shared by
the runs that follow, and stopped by itself once nobody uses it.

Prefect's ephemeral mode (no API URL) loses task-run records at exit and cannot run schedules,
so a run without a configured server gets a real Prefect server of its own, with its database
under the project's PREFECT_HOME so the UI can show the run later. Starting one costs ~3 s
(importing Prefect's server), which was most of a fully cached run; so the server outlives the
run that started it and the next run reuses it. It stops itself when no run or UI holds a lease
on it and nothing has called it for TUNELINE_SERVER_IDLE_S seconds (default 600; 0 stops it as
soon as the last lease goes), when its project folder is removed, or when another server has
taken its place. A configured PREFECT_API_URL (a shared server) is used as it is. Besides
Prefect's API and UI it serves the quality gate's Data Docs (see DataDocs).

The server answers only its own origin: Host headers other than 127.0.0.1/localhost are refused
(a web page cannot reach it by DNS rebinding) and CORS allows only the server's own address, so a
page from another site cannot read it (Prefect's default allows any origin). Prefect's own
authentication (PREFECT_SERVER_API_AUTH_STRING, with PREFECT_API_AUTH_STRING for the client)
applies when the user sets it.

    python -m tuneline.flows.server HOME PORT IDLE_S   # what the CLI starts, detached
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
LEASES = "leases"
IDLE_ENV = "TUNELINE_SERVER_IDLE_S"
DEFAULT_IDLE_S = 600
ALLOWED_HOSTS = ("127.0.0.1", "localhost")
# Prefect's own setting (and its older name): the server's database, SQLite under PREFECT_HOME unset.
DATABASE_ENVS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
EMPTY_KEY = hashlib.sha256(b"").hexdigest()[:16]  # no database setting: SQLite under PREFECT_HOME


class ServerStartError(RuntimeError):
    """The local Prefect server did not become healthy."""


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def idle_seconds() -> float:
    value = os.environ.get(IDLE_ENV, str(DEFAULT_IDLE_S))
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ServerStartError(
            f"{IDLE_ENV}={value!r} is not a number of seconds; set e.g. {IDLE_ENV}=600"
        ) from None


@contextlib.contextmanager
def locked(prefect_home: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold the project's server lock (one process at a time starts, reuses or stops its server)."""
    with open(prefect_home / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def alive(pid: int) -> bool:
    """Whether the process runs (a server this process started and that exited is reaped here)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def database_key() -> str:
    """Which database a server started now would use, as a digest (the URL may hold a password)."""
    url = next((os.environ[name] for name in DATABASE_ENVS if os.environ.get(name)), "")
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def database_hint(log_path: Path) -> str:
    """Why a server on a configured database did not start, from its log, and what to check."""
    name = next((name for name in DATABASE_ENVS if os.environ.get(name)), None)
    if name is None:
        return ""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]] or lines[-1:]
    return (
        f" ({errors[-1] if errors else 'no log'}); its database is {name}'s: check that the database "
        f"server is up and the database exists (createdb), or unset {name} for the project's SQLite"
    )


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def recorded_server(prefect_home: Path) -> dict | None:
    """The project's server as recorded, if that process still runs the same Prefect and answers."""
    try:
        record = json.loads((prefect_home / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("prefect") != version("prefect") or not alive(record["pid"]) or not healthy(record["url"]):
        return None
    return record


def reusable_server(prefect_home: Path, lease: Path) -> dict | None:
    """The recorded server when it runs on the database the environment names now. One idle on
    another database (kept up on SQLite, now the run names PostgreSQL) is replaced; one that other
    runs hold is left to them, and this run stops with the reason."""
    record = recorded_server(prefect_home)
    if record is None or record.get("database", EMPTY_KEY) == database_key():
        return record
    holders = sorted({held.name.split("-")[0] for held in live_leases(prefect_home) if held != lease})
    if holders:
        raise ServerStartError(
            f"the project's Prefect server ({record['url']}) runs on another database than "
            f"{DATABASE_ENVS[0]} now names, for the runs of processes {', '.join(holders)}; run again "
            "when they end, or with the same setting as they have"
        )
    return None


def live_leases(prefect_home: Path) -> list[Path]:
    """Leases whose process still runs; the others (a killed run's) are removed."""
    folder = prefect_home / LEASES
    leases = []
    for lease in folder.glob("*") if folder.is_dir() else ():
        if alive(int(lease.name.split("-")[0])):
            leases.append(lease)
        else:
            lease.unlink(missing_ok=True)
    return leases


def start_server(prefect_home: Path, port: int, timeout: float) -> dict:
    """Start a detached server on `port` (its own session: a Ctrl-C to this run does not stop it)."""
    url = f"http://127.0.0.1:{port}/api"
    log_path = prefect_home / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneline.flows.server",
                str(prefect_home),
                str(port),
                str(idle_seconds()),
            ],
            env={**os.environ, "PREFECT_HOME": str(prefect_home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None:
            raise ServerStartError(
                f"the Prefect server exited with code {process.returncode}; see {log_path}"
                + database_hint(log_path)
            )
        if time.monotonic() > deadline:
            process.kill()
            raise ServerStartError(
                f"the Prefect server was not healthy after {timeout:.0f} s; see {log_path}"
            )
        time.sleep(0.1)
    record = {
        "pid": process.pid,
        "port": port,
        "url": url,
        "prefect": version("prefect"),
        "database": database_key(),
    }
    write_atomic(prefect_home / SERVER_FILE, json.dumps(record))
    return record


def write_atomic(path: Path, text: str) -> None:
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(text)
    part.replace(path)


@contextlib.contextmanager
def local_prefect_server(prefect_home: Path, timeout: float = 90, port: int | None = None) -> Iterator[str]:
    """Yield the API URL of a Prefect server: the configured one, or the project's (started if needed).

    The caller holds a lease on the server while inside: it is not stopped under a running flow.
    `port` applies when a server has to be started; a running one is reused on its own port.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    prefect_home = prefect_home.resolve()
    (prefect_home / LEASES).mkdir(parents=True, exist_ok=True)
    lease = prefect_home / LEASES / f"{os.getpid()}-{secrets.token_hex(4)}"
    with locked(prefect_home):
        lease.touch()  # before a start: the new server must see it
        try:
            record = reusable_server(prefect_home, lease) or start_server(
                prefect_home, port or free_port(), timeout
            )
        except BaseException:
            lease.unlink(missing_ok=True)
            raise
    try:
        yield record["url"]
    finally:
        lease.unlink(missing_ok=True)


def stop_server(prefect_home: Path, only_if_unused: bool = False) -> dict | None:
    """Stop the project's server (if `only_if_unused`, only when no run holds a lease); the stopped one."""
    prefect_home = prefect_home.resolve()
    if not prefect_home.is_dir():
        return None
    with locked(prefect_home):
        record = recorded_server(prefect_home)
        if record is None or (only_if_unused and live_leases(prefect_home)):
            return None
        (prefect_home / SERVER_FILE).unlink(missing_ok=True)
        os.kill(record["pid"], signal.SIGTERM)
    return record


# ---- the server process ---------------------------------------------------------------------


class Activity:
    """ASGI wrapper that remembers when the last HTTP request came in."""

    def __init__(self, app) -> None:
        self.app = app
        self.last = time.monotonic()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.last = time.monotonic()
        await self.app(scope, receive, send)


DATA_DOCS = "/tuneline/data-docs/"


def data_docs_url(api_url: str, gate_digest: str) -> str:
    """Where the project's server shows the quality gate's Data Docs of one gate stage."""
    return f"{api_url.removesuffix('/api')}{DATA_DOCS}{gate_digest}/index.html"


class DataDocs:
    """ASGI wrapper that serves the gate stages' Data Docs folders, and nothing else of the project,
    at DATA_DOCS<digest>/: the UI links them, and a browser will not open file:// from an http page."""

    def __init__(self, app, gate_dir: Path) -> None:
        self.app = app
        self.gate_dir = gate_dir

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(DATA_DOCS):
            await self.app(scope, receive, send)
            return
        from starlette.exceptions import HTTPException
        from starlette.responses import PlainTextResponse
        from starlette.staticfiles import StaticFiles

        digest, _, rest = path.removeprefix(DATA_DOCS).partition("/")
        folder = self.gate_dir / digest / "data_docs"
        if digest.isalnum() and folder.is_dir():
            try:  # StaticFiles refuses paths that leave the folder
                await StaticFiles(directory=folder, html=True)(
                    {**scope, "path": f"/{rest}", "root_path": ""}, receive, send
                )
                return
            except HTTPException:
                pass
        await PlainTextResponse(f"not found in the Data Docs of gate stage {digest!r}", 404)(
            scope, receive, send
        )


def should_stop(prefect_home: Path, activity: Activity, idle_s: float) -> str | None:
    """Why the server should stop now, or None. Decided under the project's server lock."""
    if not prefect_home.is_dir():
        return "its project folder is gone"
    with locked(prefect_home, blocking=False) as held:
        if not held:  # a run is starting or reusing it right now
            return None
        try:
            record = json.loads((prefect_home / SERVER_FILE).read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("pid") not in (None, os.getpid()):
            return "another server replaced it"
        if live_leases(prefect_home) or time.monotonic() - activity.last < idle_s:
            return None
        (prefect_home / SERVER_FILE).unlink(missing_ok=True)  # no run may pick it up from now on
        return f"idle for {idle_s:.0f} s with no run holding it"


def serve(prefect_home: Path, port: int, idle_s: float) -> None:
    """Run Prefect's API and UI on 127.0.0.1:port until should_stop says why not."""
    import threading

    origins = ",".join(f"http://{host}:{port}" for host in ALLOWED_HOSTS)
    os.environ.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The UI's pages call this API; without it they call the default port 4200 and show
            # "Can't connect" (a paused review could not be answered from the browser).
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origins,
        }
    )
    import uvicorn
    from prefect.server.api.server import create_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    activity = Activity(DataDocs(create_app(final=True), prefect_home.parent / "stages" / "gate"))
    app = TrustedHostMiddleware(activity, allowed_hosts=list(ALLOWED_HOSTS))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def watch() -> None:
        while not server.should_exit:
            time.sleep(1)
            reason = should_stop(prefect_home, activity, idle_s)
            if reason:
                print(f"stopping: {reason}", flush=True)
                server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
