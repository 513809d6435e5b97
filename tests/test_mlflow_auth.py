"""`tuneline ui --mlflow-auth`: the MLflow UI asks for a user name and password (MLflow's
basic-auth app), its users are kept in the project's folder, and a first start without an admin
password says which variable to set instead of starting an open server."""

from __future__ import annotations

import base64
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tuneline.flows.server import free_port
from typer.testing import CliRunner

from tuneline.cli.main import app, mlflow_ui_command

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_a_first_auth_start_without_an_admin_password_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    result = CliRunner().invoke(app, ["ui", str(RECIPE), "--mlflow-auth"])
    assert result.exit_code == 2
    assert "--mlflow-auth: no MLflow users yet in" in result.output
    assert "set MLFLOW_AUTH_ADMIN_PASSWORD" in result.output
    assert not (tmp_path / ".tuneline" / "prefect").exists()  # no server was started


def status(url: str, credentials: str | None = None) -> int | None:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.mark.slow
def test_the_mlflow_ui_with_auth_refuses_requests_without_the_users_password(tmp_path):
    port = free_port()
    auth_dir = tmp_path / "store" / "mlflow-auth"
    command, env = mlflow_ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", port, auth_dir)
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "a-long-admin-password"
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while status(f"{base}/health") is None and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(api) == 401
        assert status(f"{base}/") == 401
        assert status(api, "admin:wrong") == 401
        assert status(api, "admin:a-long-admin-password") == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (auth_dir / "basic_auth.db").is_file()  # the users live in the project, not the cwd
    assert not Path("basic_auth.db").exists()
