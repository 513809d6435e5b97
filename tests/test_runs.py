"""`tuneline runs list` and `tuneline runs show` over a store with two registered tiny models.

The first registration becomes champion, the second (worse) only candidate; the second one is
exported (its version tagged) and the first is behind an alias, so neither expires; a third run
trained but never registered expires 15 days after it started.
"""

import json
import shutil
from datetime import datetime, timedelta

import mlflow
import pytest
from register_fixtures import MODEL_NAME, TRAIN_STATS, evaluated_stats, fake_stage, make_store
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.recipe import flatten_recipe, validate_recipe
from tuneline.register.runs import EXPORTED_TAG
from tuneline.register.stage import run_register
from tuneline.store import find_stage, write_stage

LOG_LINES = [f"2026-12-06 07:54:3{n} step {n}: loss={3.0 - n / 2}" for n in range(1, 4)]


def train_stage(store, name: str) -> object:
    """A finished train stage with the tiny model, a training log and a loss curve file."""
    with write_stage(store, "train", f"t-{name}") as writer:
        shutil.copytree(store / "tiny-model", writer.path("model"))
        writer.path("train.log").write_text("\n".join(["starting", *LOG_LINES]) + "\n")
        writer.path("loss_curve.png").write_bytes(b"\x89PNG")
        writer.stats = {**TRAIN_STATS, "examples": 2, "device": "cpu"}
    return find_stage(store, "train", f"t-{name}")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    recipe, store, splits = make_store(root)
    recipe = recipe.model_copy(update={"description": "Label support tickets with their intent"})
    stats = []
    for name, score in (("first", 0.5), ("second", 0.4)):
        trained = train_stage(store, name)
        evaluated = fake_stage(store, "evaluate", f"e-{name}", evaluated_stats(score))
        stats.append(
            json.loads(run_register(store, recipe, splits, trained, evaluated).file("stats.json").read_text())
        )
    client = mlflow.MlflowClient(recipe.register.tracking_uri)
    client.set_model_version_tag(MODEL_NAME, "2", EXPORTED_TAG, "gguf")
    client.delete_registered_model_alias(MODEL_NAME, "candidate")  # only the export keeps v2
    with mlflow.start_run(experiment_id=stats[0]["experiment_id"], tags={"tuneline.stage": "train"}) as run:
        mlflow.log_params({"name": "unregistered", "train.method": "full", "model.name": "base"})
        log = root / "train.log"
        log.write_text("\n".join(LOG_LINES) + "\n")
        mlflow.log_artifact(str(log))  # as the train stage attaches it; no stage folder in the store
    folder = store / "runs" / "20261206-080000-brave-otter"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"registry": stats[1]}))
    args = ["--artifacts-dir", str(store), "--tracking-uri", recipe.register.tracking_uri]
    return {"stats": stats, "args": args, "store": store, "unregistered": run.info.run_id}


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_list_shows_every_run_with_its_fields(project):
    result = invoke("runs", "list", "--json", *project["args"])
    assert result.exit_code == 0, result.output
    rows = {row["run_id"]: row for row in json.loads(result.output)}
    first, second = (rows[s["run_id"]] for s in project["stats"])
    assert (
        first["name"] == "registry-test" and first["description"] == "Label support tickets with their intent"
    )
    assert first["status"] == "registered" and first["method"] == "lora" and first["base_model"] == "base"
    assert first["data_size"] == 2
    assert (first["metric"], first["metric_value"], second["metric_value"]) == ("tuned_exact_match", 0.5, 0.4)
    assert first["model_uri"] == f"models:/{MODEL_NAME}/1" and first["aliases"] == ["champion"]
    assert first["expires"] == "kept" and second["expires"] == "kept"  # an alias / an export keeps them
    other = rows[project["unregistered"]]
    assert other["status"] == "trained, not registered" and other["method"] == "full"
    expires = datetime.fromisoformat(other["created"]) + timedelta(days=15)
    assert other["expires"] == expires.date().isoformat()
    table = invoke("runs", "list", *project["args"])
    assert table.exit_code == 0
    for text in (
        "registry-test",
        "Label support tickets",
        "registered",
        "lora",
        "kept",
        f"models:/{MODEL_NAME}/1",
    ):
        assert text in table.output


def test_show_prints_parameters_data_training_evaluation_and_commands(project):
    result = invoke("runs", "show", f"{MODEL_NAME}@champion", *project["args"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train.method" in out and "train.learning_rate" in out  # hyper-parameters
    assert "Training data: train 2, validation 1, test 1" in out and "Funnel" in out
    assert str(project["store"] / "stages" / "train" / "t-first" / "loss_curve.png") in out
    assert LOG_LINES[-1] in out and "last 4 lines" in out
    assert "exact_match" in out and "promoted to champion: no champion yet" in out
    assert "not exported" in out
    assert f"tuneline serve models:/{MODEL_NAME}/1" in out
    assert f"tuneline export models:/{MODEL_NAME}/1 --format merged --to" in out


def test_show_by_version_run_id_or_run_folder_as_json(project):
    second = project["stats"][1]
    for ref in (f"models:/{MODEL_NAME}/2", second["run_id"], "20261206-080000-brave-otter"):
        result = invoke("runs", "show", ref, "--json", "--log-lines", "2", *project["args"])
        assert result.exit_code == 0, result.output
        found = json.loads(result.output)
        assert found["run_id"] == second["run_id"]
        assert found["training"]["log_tail"] == LOG_LINES[-2:]
        assert found["export"] == {"exported": True, "detail": "gguf"}
        assert found["registry"]["promoted"] is False and "does not beat" in found["registry"]["reason"]
        assert found["registry"]["champion_version_before"] == "1"
        assert found["evaluation"]["tuned"]["exact_match"] == 0.4
        assert found["hyperparameters"]["train.method"] == "lora"


def test_show_compares_with_the_champion_and_says_it_was_exported(project):
    result = invoke("runs", "show", f"models:/{MODEL_NAME}/2", *project["args"])
    assert result.exit_code == 0, result.output
    assert "Registry: not promoted: tuned_exact_match 0.4 vs champion v1 0.5" in result.output
    assert "Champion comparison: tuned_exact_match 0.4 vs champion v1 0.5" in result.output
    assert "Export: exported (gguf)" in result.output


def test_show_reads_the_log_from_mlflow_when_the_store_has_no_train_stage(project):
    result = invoke("runs", "show", project["unregistered"], "--json", *project["args"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["status"] == "trained, not registered" and found["registry"] == {}
    assert found["training"]["log"] == f"runs:/{project['unregistered']}/train.log"
    assert found["training"]["log_tail"] == LOG_LINES and found["training"]["loss_curve"] is None
    assert found["commands"] == {} and found["export"] == {"exported": False, "detail": None}
    text = invoke("runs", "show", project["unregistered"], *project["args"])
    assert "Registry: not registered" in text.output and LOG_LINES[0] in text.output


def test_an_unknown_run_is_an_error_listing_some_that_exist(project):
    result = invoke("runs", "show", "no-such-run", *project["args"])
    assert result.exit_code == 2
    assert "RUN 'no-such-run': no such MLflow run, registered version or run folder" in result.output
    assert project["stats"][1]["run_id"] in result.output and "20261206-080000-brave-otter" in result.output


def test_a_run_folder_that_registered_nothing_says_so(project):
    folder = project["store"] / "runs" / "20261206-081000-failed-fox"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("name: registry-test\n")
    result = invoke("runs", "show", str(folder), *project["args"])
    assert result.exit_code == 2
    assert "the run folder" in result.output and "holds no registered run" in result.output


def test_an_empty_project_lists_nothing_and_creates_no_store(tmp_path):
    result = invoke("runs", "list", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0 and "no runs yet" in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_a_description_leaves_digests_of_recipes_without_one_unchanged():
    plain = {"name": "x", "sources": [{"name": "a", "path": "a.jsonl"}], "model": {"name": "m"}}
    plain["register"] = {"model_name": "m"}
    recipe = validate_recipe(plain)
    assert "description" not in recipe.model_dump() and flatten_recipe(recipe)["description"] == ""
    described = validate_recipe({**plain, "description": "Intents"})
    assert described.digest() != recipe.digest() and flatten_recipe(described)["description"] == "Intents"
