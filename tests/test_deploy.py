"""`tuneline deploy`: the deployments of deployments/prefect.yaml on a real Prefect server, for a
recipe, with the recipe's refresh schedule; and a real process worker running them when their
schedules fire (refresh with unchanged data, with changed data, retention with an injected clock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.store import StageRef

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"


def write_recipe(folder: Path, **sections) -> Path:
    """A small recipe file in `folder` (only deployed here, not run)."""
    data = {
        "name": "deploy-test",
        "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
        "model": {"name": "base"},
        "register": {"model_name": "deploy-test"},
        **sections,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def api_url(prefect_server, monkeypatch):
    """The test server's API URL in the environment, as a user's shared server would be."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    return PREFECT_API_URL.value()


def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_deploy_creates_the_recipes_deployments_with_its_refresh_schedule(api_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, refresh={"interval_minutes": 30})
    result = CliRunner().invoke(app, ["deploy", str(recipe), "--prefect-file", str(PREFECT_FILE)])
    assert result.exit_code == 0, result.output
    assert f"PREFECT_API_URL={api_url} prefect worker start --pool tuneline" in result.output
    assert "refresh/deploy-test" in result.output and "every 1800 s" in result.output

    refresh = read_deployment("refresh/deploy-test")
    assert [s.schedule.interval for s in refresh.schedules] == [timedelta(minutes=30)]
    assert refresh.parameters["recipe"]["name"] == "deploy-test"
    assert refresh.job_variables == {"working_dir": str(tmp_path.resolve())}
    assert refresh.entrypoint == "tuneline.flows.refresh.refresh"  # from the installed package
    # A refresh still running when the next is due: the next one is cancelled.
    assert refresh.global_concurrency_limit.limit == 1
    assert refresh.concurrency_options.collision_strategy == "CANCEL_NEW"
    retention = read_deployment("retention/deploy-test")
    assert [s.schedule.cron for s in retention.schedules] == ["30 3 * * *"]
    finetune = read_deployment("finetune/deploy-test")
    assert finetune.schedules == []  # triggered from the UI, with the recipe as the form's values
    assert finetune.parameter_openapi_schema["required"] == ["recipe"]

    # Deploying again updates the same deployments (a new schedule replaces the old one).
    recipe = write_recipe(tmp_path, refresh={"cron": "0 3 * * 1", "timezone": "Europe/Paris"})
    result = CliRunner().invoke(
        app, ["deploy", str(recipe), "--prefect-file", str(PREFECT_FILE), "--only", "refresh"]
    )
    assert result.exit_code == 0, result.output
    assert "cron 0 3 * * 1 (Europe/Paris)" in result.output
    schedules = read_deployment("refresh/deploy-test").schedules
    assert [(s.schedule.cron, s.schedule.timezone) for s in schedules] == [("0 3 * * 1", "Europe/Paris")]


def test_a_bad_deployment_file_or_flow_name_is_a_clear_error(api_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path)
    result = CliRunner().invoke(app, ["deploy", str(recipe)])  # no deployments/ in this folder
    assert result.exit_code == 2
    assert "deployments/prefect.yaml: No such file or directory; run from the project folder" in result.output

    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump({"deployments": [{"name": "x", "entrypoint": "my_flows.py:go"}]}))
    result = CliRunner().invoke(app, ["deploy", str(recipe), "--prefect-file", str(bad)])
    assert result.exit_code == 2
    assert "deployments[0] (x): entrypoint 'my_flows.py:go' is not one of Tuneline's flows" in result.output

    result = CliRunner().invoke(
        app, ["deploy", str(recipe), "--prefect-file", str(PREFECT_FILE), "--only", "nightly"]
    )
    assert result.exit_code == 2
    assert "--only nightly: no such deployment" in result.output


DATA = ROOT / "recipes" / "data" / "support_intents.jsonl"


@pytest.fixture
def project(tmp_path):
    """A project folder: 200 records of the quickstart's data, a tiny base model, a recipe whose
    registration needs a win by a margin no retrained model reaches (the champion stays)."""
    from tuneline.models import make_tiny_model

    lines = DATA.read_text().splitlines()
    (tmp_path / "tickets.jsonl").write_text("\n".join(lines[:200]) + "\n")
    texts = [json.loads(line)["instruction"] for line in lines[:200] if line.endswith("}")]
    make_tiny_model(tmp_path / "base", texts, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4)
    write_recipe(
        tmp_path,
        artifacts_dir="store",
        gate={"min_records": 50, "min_chars": 1, "max_chars": 400},
        train={"max_steps": 3, "batch_size": 16, "max_length": 96},
        evaluate={"max_new_tokens": 3, "max_examples": 4},
        register={"model_name": "deploy-test", "margin": 1.0},
    )
    return tmp_path


def flow_runs(flow_name: str, state: str = "COMPLETED") -> list:
    """The runs of a flow in that state, oldest first by end time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))
            ),
        )
    return sorted(runs, key=lambda run: run.end_time)


def task_names(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0] for run in runs}


def wait_for_runs(flow_name: str, count: int, worker, timeout: float = 240) -> list:
    """Block until `count` runs of the flow completed; fail on a failed run or a dead worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = flow_runs(flow_name, "FAILED") + flow_runs(flow_name, "CRASHED")
        assert not failed, f"{flow_name} run {failed[0].name} failed: {failed[0].state.message}"
        assert worker.poll() is None, "the worker exited"
        done = flow_runs(flow_name)
        if len(done) >= count:
            return done
        time.sleep(1)
    raise AssertionError(f"{count} completed {flow_name} runs not seen in {timeout:.0f} s")


def registered_versions(project: Path) -> dict[str, list[str]]:
    """Version number -> its aliases, in the recipe's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'store' / 'mlflow.db'}")
    versions = {str(v.version): [] for v in client.search_model_versions("name='deploy-test'")}
    for alias, version in client.get_registered_model("deploy-test").aliases.items():
        versions[str(version)].append(alias)
    return {version: sorted(aliases) for version, aliases in versions.items()}


def add_records_and_wait_for_a_refresh(project: Path, lines: list[str], worker) -> None:
    """Append records to the source file and wait for a refresh that started after that."""
    with (project / "tickets.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    changed_at = datetime.now(UTC)
    deadline = time.monotonic() + 240
    while not [run for run in wait_for_runs("refresh", 1, worker) if run.start_time > changed_at]:
        assert time.monotonic() < deadline, "no refresh ran after the data changed"
        time.sleep(1)


def stop_worker(worker: subprocess.Popen) -> None:
    """Stop the worker and the flow runs it has going (each in a session of its own). A stopping
    worker waits for its runs, and a refresh fires every 4 s: under load one still in flight kept
    the worker up past 30 s and then hung on once the server had gone."""
    import psutil

    def kill_runs() -> None:
        for child in psutil.Process(worker.pid).children(recursive=True):
            child.kill()

    if worker.poll() is not None:
        return
    kill_runs()
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_runs()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


def train_unregistered(project: Path, recipe) -> Path:
    """A train stage with another seed on the newest split, in this process, registered nowhere."""
    from tuneline.train.stage import run_train

    splits = max(
        (project / "store" / "stages" / "split").iterdir(), key=lambda folder: folder.stat().st_mtime
    )
    ref = StageRef(stage="split", digest=splits.name, path=str(splits))
    trained = run_train(project / "store", ref, recipe.model, recipe.train.model_copy(update={"seed": 7}))
    return Path(trained.path)


@pytest.mark.slow
def test_scheduled_refresh_and_retention_run_on_a_worker(project, monkeypatch):
    """The refresh deployment fires every few seconds on a real worker: the first run trains and
    promotes, a run with unchanged data trains nothing, a run after the data changed trains and
    registers without promoting (no win), and the retention deployment, with its clock 30 days
    ahead, removes a trained model nothing keeps and keeps the champion and the candidate."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tuneline.flows.server import local_prefect_server, stop_server

    from tuneline.recipe import load_recipe

    monkeypatch.chdir(project)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = project / "store" / "prefect"
    recipe = load_recipe(project / "recipe.yaml")
    try:
        with local_prefect_server(home) as api_url, temporary_settings({PREFECT_API_URL: api_url}):
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "tuneline"],
                env={**os.environ, "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                check_scheduled_runs(project, recipe, api_url, worker)
            finally:
                stop_worker(worker)  # while the server is up: a run cut off from it hangs
    finally:
        stop_server(home)


def check_scheduled_runs(project: Path, recipe, api_url: str, worker: subprocess.Popen) -> None:
    """The scheduled refresh and retention runs on `worker`, and what each leaves in the store."""
    from tuneline.flows.deploy import deploy, plan_deployments

    deploy(
        api_url,
        plan_deployments(recipe, PREFECT_FILE, only=["refresh"], every={"refresh": 4}),
        project,
    )
    first = wait_for_runs("refresh", 1, worker)[0]
    assert "train" in task_names(first.id)
    assert registered_versions(project) == {"1": ["candidate", "champion"]}

    unchanged = wait_for_runs("refresh", 2, worker)[1]
    names = task_names(unchanged.id)
    assert "collect" in names and not names & {"clean", "train", "evaluate", "register"}
    assert registered_versions(project) == {"1": ["candidate", "champion"]}

    lines = DATA.read_text().splitlines()
    add_records_and_wait_for_a_refresh(project, lines[200:240], worker)
    assert registered_versions(project) == {"1": ["champion"], "2": ["candidate"]}  # no win
    experiment = train_unregistered(project, recipe)  # someone's try, never registered

    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    retention = plan_deployments(
        recipe, PREFECT_FILE, only=["retention"], every={"retention": 4},
        parameters={"retention": {"now": later}},
    )  # fmt: skip
    deploy(api_url, retention, project)
    wait_for_runs("retention", 1, worker)
    # 30 days old by the injected clock: the model no alias keeps goes, the aliased stay.
    assert not experiment.exists()
    assert registered_versions(project) == {"1": ["champion"], "2": ["candidate"]}
    assert all((project / "store" / "stages" / stage).is_dir() for stage in ("collect", "split"))
