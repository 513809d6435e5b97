"""Shared fixtures: a real Prefect test server for flow tests, and environment hygiene."""

import os

import pytest
from openai_server import teacher_server  # noqa: F401  (the loopback OpenAI server fixture)
from postgres_server import postgres  # noqa: F401  (a real PostgreSQL for the session)

# Nothing in the test suite may reach a hub; fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# A run's local Prefect server stops as soon as the run ends (users' servers wait for the next run).
os.environ.setdefault("TUNELINE_SERVER_IDLE_S", "0")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (SQLite in a temp folder) for the whole session, with no heartbeat wait."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield
