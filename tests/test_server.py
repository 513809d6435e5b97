"""The project's local Prefect server: reused by the next run, gone once idle, closed to other sites."""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from tuneline.flows.server import SERVER_FILE, alive, data_docs_url, local_prefect_server, stop_server

pytestmark = pytest.mark.slow


def wait_until(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("TUNELINE_SERVER_IDLE_S", "3")
    home = tmp_path / "prefect"
    yield home
    stop_server(home)


def pid_of(home) -> int:
    return json.loads((home / SERVER_FILE).read_text())["pid"]


def test_the_next_run_reuses_the_server_and_it_stops_once_idle(home):
    with local_prefect_server(home, timeout=120) as first:
        pid = pid_of(home)
        time.sleep(4)  # longer than the idle limit: the lease keeps it up
        assert alive(pid)
    with local_prefect_server(home, timeout=120) as second:
        assert second == first and pid_of(home) == pid
    assert wait_until(lambda: not alive(pid)), "the idle server did not stop"
    assert not (home / SERVER_FILE).exists()


def test_a_killed_runs_lease_does_not_keep_the_server_up(home):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from tuneline.flows.server import local_prefect_server\n"
            "with local_prefect_server(Path(sys.argv[1]), timeout=120):\n"
            "    print('up', flush=True); time.sleep(600)",
            str(home),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "up"
    pid = pid_of(home)
    holder.kill()  # kill -9: its lease stays behind, naming a dead process
    holder.wait()
    assert list((home / "leases").iterdir())
    assert wait_until(lambda: not alive(pid)), "a dead run's lease kept the server up"


def test_the_server_stops_when_its_project_folder_is_removed(home):
    import shutil

    with local_prefect_server(home, timeout=120):
        pid = pid_of(home)
        os.environ["TUNELINE_SERVER_IDLE_S"] = "600"
    shutil.rmtree(home)
    assert wait_until(lambda: not alive(pid)), "the server outlived its project folder"


def request(url: str, headers: dict, data: bytes | None = None, method: str | None = None):
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def test_a_foreign_web_page_cannot_read_the_api_and_the_ui_calls_its_own_port(home):
    with local_prefect_server(home, timeout=120) as api_url:
        own = api_url.removesuffix("/api")
        secrets = f"{api_url}/block_documents/filter"
        body = json.dumps({"include_secrets": True}).encode()

        status, headers, _ = request(secrets, {"Origin": own}, body)
        assert status == 200 and headers.get("access-control-allow-origin") == own

        status, headers, _ = request(secrets, {"Origin": "https://evil.example"}, body)
        assert "access-control-allow-origin" not in {name.lower() for name in headers}

        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        status, headers, _ = request(secrets, preflight, method="OPTIONS")
        assert status == 400 and "access-control-allow-origin" not in {name.lower() for name in headers}

        status, _, _ = request(secrets, {"Host": "evil.example", "Origin": "http://evil.example"}, body)
        assert status == 400  # DNS rebinding: a foreign name that resolves to 127.0.0.1

        status, _, settings = request(f"{own}/ui-settings", {})
        assert json.loads(settings)["api_url"] == api_url


def test_the_server_shows_the_gates_data_docs_and_nothing_else_of_the_project(home):
    stage = home.parent / "stages" / "gate" / "0123abcd"
    (stage / "data_docs").mkdir(parents=True)
    (stage / "data_docs" / "index.html").write_text("<h1>Validation results</h1>")
    (stage / "records.jsonl").write_text('{"secret": "training data"}')
    with local_prefect_server(home, timeout=120) as api_url:
        url = data_docs_url(api_url, "0123abcd")
        status, headers, page = request(url, {})
        assert status == 200 and b"Validation results" in page and "text/html" in headers["content-type"]
        assert request(url.removesuffix("index.html"), {})[2] == page
        base = api_url.removesuffix("/api")
        host, port = base.removeprefix("http://").split(":")
        for path in (
            "/tuneline/data-docs/0123abcd/../records.jsonl",
            "/tuneline/data-docs/0123abcd%2F..%2Frecords.jsonl",
        ):
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 404 and b"training data" not in response.read(), path
        assert request(f"{base}/tuneline/data-docs/ffff/index.html", {})[0] == 404
