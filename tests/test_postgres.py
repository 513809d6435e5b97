"""MLflow's tracking and registry store and the Prefect server on a real PostgreSQL.

`tuneline run recipe.yaml register.tracking_uri=postgresql://...` with
PREFECT_SERVER_DATABASE_CONNECTION_URL set, as a user points a project at a team's database:
the model is registered with its champion alias there, `tuneline runs list` and `tuneline serve`'s
resolver read it, the Prefect flow runs are rows of the PostgreSQL database, and a second run
reuses every stage and registers nothing new. A database that is down stops the run before any
stage with a message naming register.tracking_uri, not after MLflow's ~100 s of retries.
"""

import json
import os
import time
from pathlib import Path

import mlflow
import pytest
from postgres_server import free_port
from train_fixtures import small_project
from tuneline.flows.server import ServerStartError, local_prefect_server, reusable_server, stop_server
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.errors import UserError
from tuneline.experiment import check_tracking_store
from tuneline.recipe import RecipeError, validate_recipe
from tuneline.register.serve import resolve_model

pytestmark = pytest.mark.slow

MODEL = "pg-test"


@pytest.fixture(scope="module")
def project(tmp_path_factory, postgres):
    """A recipe file over 120 quickstart records and a tiny base model, and fresh databases."""
    root = tmp_path_factory.mktemp("pg-project")
    small_project(root, MODEL)
    return {
        "root": root,
        "store": root / "store",
        "mlflow": postgres.create_database("mlflow_test"),
        "prefect": postgres.create_database("prefect_test"),
        "prefect_asyncpg": postgres.url("prefect_test", driver="asyncpg"),
    }


@pytest.fixture(scope="module")
def services(project):
    """What a user sets: no shared Prefect API, the project's server on PostgreSQL, kept up between
    the module's runs (and stopped at the end)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    home = project["store"] / "prefect"
    with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        patch.delenv("PREFECT_API_URL", raising=False)
        patch.setenv("PREFECT_HOME", str(home))
        patch.setenv("TUNELINE_SERVER_IDLE_S", "120")
        patch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", project["prefect_asyncpg"])
        yield patch
        stop_server(home)


def tuneline(project, *overrides: str):
    """`tuneline run RECIPE OVERRIDES...`, in this process."""
    return CliRunner().invoke(app, ["run", str(project["root"] / "recipe.yaml"), *overrides])


def reports(project) -> list[dict]:
    """The runs' report.json files, oldest first."""
    paths = sorted((project["store"] / "runs").glob("*/report.json"))  # a failed run has none
    return [json.loads(path.read_text()) for path in paths]


def test_a_database_that_is_down_stops_the_run_before_any_stage(project, services):
    wrong = f"postgresql://tuneline@127.0.0.1:{free_port()}/mlflow"
    started = time.monotonic()
    result = tuneline(project, f"register.tracking_uri={wrong}")
    assert result.exit_code == 1, result.output
    assert time.monotonic() - started < 30  # not MLflow's ~100 s of retries
    output = " ".join(result.output.split())  # the console wraps lines at the terminal's width
    assert f"register.tracking_uri {wrong}: cannot connect to the MLflow database" in output
    assert "start the database server, or fix the host, port" in output
    assert "Traceback" not in output
    assert not (project["store"] / "stages").exists()


def test_a_bad_driver_or_password_is_named_without_showing_the_password(postgres):
    with pytest.raises(UserError, match=r"register.tracking_uri: .*not a database URL MLflow can use"):
        check_tracking_store("postgresql+nosuchdriver://me:secret@127.0.0.1/mlflow")
    with pytest.raises(UserError, match=r'database "absent" does not exist') as raised:
        check_tracking_store(postgres.url("absent").replace("tuneline@", "tuneline:secret@"))
    assert "secret" not in str(raised.value)


def test_runs_register_and_record_in_postgresql(project, services, postgres):
    tracking = f"register.tracking_uri={project['mlflow']}"

    first = tuneline(project, tracking)
    assert first.exit_code == 0, first.output
    client = mlflow.MlflowClient(project["mlflow"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    assert postgres.query("mlflow_test", "SELECT name FROM registered_models") == [(MODEL,)]

    listed = CliRunner().invoke(
        app,
        [
            "runs",
            "list",
            "--json",
            "--artifacts-dir",
            str(project["store"]),
            "--tracking-uri",
            project["mlflow"],
        ],
    )
    assert listed.exit_code == 0, listed.output
    assert [row["model_uri"] for row in json.loads(listed.output)] == [f"models:/{MODEL}/1"]

    second = tuneline(project, tracking)
    assert second.exit_code == 0, second.output
    before, after = reports(project)[-2:]
    assert after["stage_dirs"] == before["stage_dirs"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]

    runs = postgres.query(
        "prefect_test",
        "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id ORDER BY r.created",
    )
    assert runs[-2:] == [("finetune", "COMPLETED"), ("finetune", "COMPLETED")]  # after the failed one

    served = resolve_model(f"models:/{MODEL}@champion", project["store"], project["mlflow"])
    assert served.version == "1" and served.stage_dir == Path(before["stage_dirs"]["train"]).resolve()


def test_a_prefect_database_that_does_not_exist_is_named(services, postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", postgres.url("absent", driver="asyncpg"))
    with (
        pytest.raises(
            ServerStartError, match=r'database "absent" does not exist.*check that the database server'
        ),
        local_prefect_server(tmp_path / "prefect", timeout=60),
    ):
        pass


def test_a_server_on_another_database_is_not_reused(project, services, monkeypatch):
    """The project's server stays up between runs; a run whose environment names another database
    (here none: SQLite) replaces it when it is idle, and stops with the reason while others hold it."""
    home, new_lease = project["store"] / "prefect", project["store"] / "prefect" / "leases" / "new-run"
    with local_prefect_server(home) as url:  # the PostgreSQL one: up from the tests above, or started
        monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL")
        with pytest.raises(ServerStartError, match=rf"runs on another database .* processes {os.getpid()}"):
            reusable_server(home, new_lease)
    assert reusable_server(home, new_lease) is None
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", project["prefect_asyncpg"])
    assert reusable_server(home, new_lease)["url"] == url


def test_a_password_in_the_tracking_uri_is_refused_and_not_shown():
    """It would land in recipe.yaml, stats and the Prefect run's parameters: libpq's PGPASSWORD or
    ~/.pgpass keep it out of the recipe."""
    data = {
        "name": "pg-test",
        "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
        "model": {"name": "base"},
        "register": {"model_name": MODEL, "tracking_uri": "postgresql://me:s3cret@db.example:5432/mlflow"},
    }
    with pytest.raises(RecipeError) as raised:
        validate_recipe(data)
    message = str(raised.value)
    assert "register.tracking_uri: holds a password" in message and "set PGPASSWORD or ~/.pgpass" in message
    assert "postgresql://me:***@db.example:5432/mlflow" in message and "s3cret" not in message
    data["register"]["tracking_uri"] = "postgresql://me@db.example:5432/mlflow"
    assert validate_recipe(data).register.tracking_uri == "postgresql://me@db.example:5432/mlflow"
