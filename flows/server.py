"""A local Prefect server for one CLI run: started on a free loopback port, stopped afterwards.

Prefect's ephemeral mode (no API URL) loses task-run records at exit and cannot run schedules,
so a run without a configured server gets a real `prefect server start` of its own, with its
database under the project's PREFECT_HOME so the UI can show the run later. A configured
PREFECT_API_URL (a shared server) is used as it is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerStartError(RuntimeError):
    """The local Prefect server did not become healthy."""


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Poll /health until the server answers, failing early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"the Prefect server exited with code {process.returncode}; see {log_path}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ServerStartError(f"the Prefect server was not healthy after {timeout:.0f} s; see {log_path}")


@contextmanager
def local_prefect_server(prefect_home: Path, timeout: float = 90) -> Iterator[str]:
    """Yield the API URL of a Prefect server: the configured one, or a local one started here."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI's pages call this API; without it they call the default port 4200 and show
        # "Can't connect" (a paused review could not be answered from the browser).
        "PREFECT_UI_API_URL": url,
    }
    log_path = prefect_home / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_healthy(url, process, timeout, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # uvicorn sometimes needs a second signal
            process.kill()
            process.wait()
