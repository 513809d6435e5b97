"""The whole `finetune` flow on a tiny local model, under a real Prefect test server.

Checks what a user relies on: the funnel adds up, bad records are in rejects with file:line,
the registered model reloads by alias in a fresh process with the same outputs, a second run
reuses every stage, a training change re-runs only training and what follows, and a failing
quality gate stops the run before training.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneline.curate.gate import GateFailed
from tuneline.errors import UserError
from tuneline.models import make_tiny_model
from tuneline.recipe import validate_recipe
from tuneline.store import iter_jsonl

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "support_intents.jsonl"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with a 260-record slice of the quickstart data and a tiny base model."""
    root = tmp_path_factory.mktemp("project")
    lines = DATA.read_text().splitlines()[:260]
    (root / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    texts = [json.loads(line)["instruction"] for line in lines if line.endswith("}")]
    make_tiny_model(
        root / "base",
        texts + ["refund", "complaint"],
        vocab_size=400,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
    )
    return root


def recipe_for(project, **sections):
    data = {
        "name": "flow-test",
        "artifacts_dir": str(project / "store"),
        "sources": [{"name": "tickets", "path": str(project / "tickets.jsonl")}],
        "gate": {"min_records": 50, "min_chars": 1, "max_chars": 400},
        "model": {"name": str(project / "base")},
        "train": {
            "max_steps": 12,
            "batch_size": 16,
            "learning_rate": 0.003,
            "max_length": 96,
            "lora": {"r": 8, "alpha": 16, "modules_to_save": ["embed_tokens", "lm_head"]},
        },
        "evaluate": {"max_new_tokens": 6, "max_examples": 12},
        "register": {"model_name": "flow-test", "tracking_uri": f"sqlite:///{project / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate_recipe(data)


@pytest.fixture(scope="module")
def first_run(project, prefect_server):
    from tuneline.flows.finetune import finetune

    return finetune(recipe_for(project))


def test_funnel_adds_up_and_bad_lines_are_rejected_with_file_and_line(first_run, project):
    funnel = {row["stage"]: row for row in first_run["funnel"]}
    assert funnel["collect"]["in"] == 260
    assert funnel["collect"]["dropped"] == {"unreadable": 1}
    assert funnel["clean"]["in"] == funnel["collect"]["out"]
    assert funnel["clean"]["dropped"]["empty_turn"] == 1
    assert funnel["clean"]["dropped"]["duplicate"] >= 1
    assert funnel["split"]["in"] == funnel["gate"]["out"]
    assert sum(first_run["splits"].values()) == funnel["split"]["out"]
    assert funnel["split"]["out"] + funnel["split"]["dropped"].get("contaminated", 0) == funnel["split"]["in"]
    collect_dir = Path(first_run["stage_dirs"]["collect"])
    reject = json.loads((collect_dir / "rejects.jsonl").read_text().splitlines()[0])
    assert reject["detail"].startswith(f"{project / 'tickets.jsonl'}:43:")


def test_run_folder_keeps_resolved_recipe_and_report(first_run):
    run_dir = Path(first_run["run_dir"])
    assert "learning_rate: 0.003" in (run_dir / "recipe.yaml").read_text()
    assert json.loads((run_dir / "report.json").read_text())["funnel"] == first_run["funnel"]


def test_registered_model_reloads_by_alias_in_a_fresh_process(first_run, project):
    registry = first_run["registry"]
    assert registry["promoted"] is True
    predictions = list(iter_records_at(first_run["stage_dirs"]["evaluate"], "predictions.jsonl"))
    test_records = {r["id"]: r for r in iter_records_at(first_run["stage_dirs"]["split"], "test.jsonl")}
    conversations = [test_records[p["id"]]["messages"] for p in predictions]
    script = textwrap.dedent(f"""
        import json, sys, mlflow
        mlflow.set_tracking_uri({registry_uri(project)!r})
        model = mlflow.pyfunc.load_model("models:/flow-test@champion")
        print(json.dumps(list(model.predict(json.load(sys.stdin)))))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(conversations),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    replies = json.loads(result.stdout.strip().splitlines()[-1])
    assert replies == [p["tuned"] for p in predictions]


def test_second_run_reuses_every_stage(first_run, project):
    from tuneline.flows.finetune import finetune

    again = finetune(recipe_for(project))
    assert again["stage_dirs"] == first_run["stage_dirs"]
    assert again["registry"]["version"] == first_run["registry"]["version"]


def test_training_change_reruns_only_training_and_after(first_run, project):
    from tuneline.flows.finetune import finetune

    changed = finetune(recipe_for(project, train={"learning_rate": 0.002}))
    before, after = first_run["stage_dirs"], changed["stage_dirs"]
    for stage in ("collect", "clean", "gate", "split"):
        assert after[stage] == before[stage], stage
    for stage in ("train", "evaluate", "register"):
        assert after[stage] != before[stage], stage


def test_failing_gate_stops_before_training(first_run, project):
    from tuneline.flows.finetune import finetune

    with pytest.raises(GateFailed, match="10000"):
        finetune(recipe_for(project, gate={"min_records": 10000}))
    train_dirs = list((project / "store" / "stages" / "train").iterdir())
    assert len(train_dirs) == 2  # the two successful runs above, nothing from the failed one


def registry_uri(project):
    return f"sqlite:///{project / 'mlflow.db'}"


def iter_records_at(path, name):
    return iter_jsonl(Path(path) / name)


def test_a_bad_test_suite_stops_the_run_before_any_stage(project, prefect_server, tmp_path):
    """Not after collecting, cleaning and training: the suite is read first."""
    from tuneline.flows.finetune import finetune

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "cases:\n  - name: refund\n    prompt: I want my money back\n    assert:\n      - regex: '('\n"
    )
    recipe = recipe_for(project, evaluate={"suites": [str(suite)]})
    recipe = recipe.model_copy(update={"artifacts_dir": str(tmp_path / "store")})
    state = finetune(recipe, return_state=True)
    with pytest.raises(UserError, match=r"suite.yaml:2: case 1 .*regex: not a valid regular expression"):
        state.result()
    assert not (tmp_path / "store" / "stages").exists()
    # The run's log (what the UI shows for a worker's run) has the message without a traceback.
    messages = run_log(state.state_details.flow_run_id)
    assert "regex: not a valid regular expression" in messages and "Traceback" not in messages


def run_log(flow_run_id) -> str:
    """Every log line a flow run sent to the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)
