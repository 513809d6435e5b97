"""The register stage against a real MLflow tracking store (SQLite in a temp folder).

Three trained models go through `run_register` in order: the first becomes champion, a worse one
only becomes candidate, a clearly better one takes champion. The champion then reloads by alias in
a fresh process and answers exactly like the merged model folder it was logged from.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from register_fixtures import CONVERSATIONS, MODEL_NAME, make_store, trained_and_evaluated
from rich.console import Console

from tuneline.cli.console import print_report
from tuneline.evaluate.stage import generate_replies
from tuneline.experiment import MAX_PARAM_CHARS, truncate_params
from tuneline.models import load_model, load_tokenizer
from tuneline.recipe import ModelSpec, dump_recipe
from tuneline.register.registry import decide_promotion, settle_version
from tuneline.register.stage import load_registered, model_requirements, run_register
from tuneline.report import registry_line
from tuneline.store import read_stats


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Three registrations: first (0.5), worse (0.4), better by more than the margin (0.8)."""
    root = tmp_path_factory.mktemp("registry")
    recipe, store, splits = make_store(root)
    refs = []
    for n, score in enumerate((0.5, 0.4, 0.8)):
        trained, evaluated = trained_and_evaluated(store, str(n), score)
        refs.append((trained, evaluated, run_register(store, recipe, splits, trained, evaluated)))
    return {"root": root, "recipe": recipe, "store": store, "splits": splits, "refs": refs}


def test_first_becomes_champion_worse_stays_candidate_better_takes_over(registered):
    stats = [read_stats(ref) for _, _, ref in registered["refs"]]
    assert [s["version"] for s in stats] == ["1", "2", "3"]
    assert [s["promoted"] for s in stats] == [True, False, True]
    assert stats[0]["reason"] == "no champion yet"
    assert stats[1]["champion_metric_before"] == 0.5 and stats[1]["candidate_metric"] == 0.4
    assert "does not beat" in stats[1]["reason"]
    assert stats[2]["champion_version_before"] == "1" and "beats" in stats[2]["reason"]
    assert stats[2]["model_uri"] == f"models:/{MODEL_NAME}/3"
    client = mlflow.MlflowClient(registered["recipe"].register.tracking_uri)
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"champion": "3", "candidate": "3"}
    assert client.get_model_version(MODEL_NAME, "2").tags["tuneline.promoted"] == "false"
    # What each run prints is what its stage did: the aliases it set when it decided.
    assert [s["aliases"] for s in stats] == [
        ["candidate", "champion"],
        ["candidate"],
        ["candidate", "champion"],
    ]
    for ref, version in zip((ref for _, _, ref in registered["refs"]), "123", strict=True):
        tags = client.get_model_version(MODEL_NAME, version).tags
        assert tags["tuneline.stage_digest"] == ref.digest
        assert tags["tuneline.aliases"] == ",".join(read_stats(ref)["aliases"])


def test_run_holds_recipe_params_metrics_and_dataset_lineage(registered):
    stats = read_stats(registered["refs"][0][2])
    client = mlflow.MlflowClient(registered["recipe"].register.tracking_uri)
    run = client.get_run(stats["run_id"])
    assert run.info.run_name == "registry-test"
    assert run.data.params["register.model_name"] == MODEL_NAME
    assert len(run.data.params["model.chat_template"]) == MAX_PARAM_CHARS
    assert run.data.metrics["tuned_exact_match"] == 0.5 and run.data.metrics["base_loss"] == 6.1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    recipe_file = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recipe.yaml")
    assert Path(recipe_file).read_text() == dump_recipe(registered["recipe"])
    inputs = {
        i.dataset.name: (
            i.dataset.digest,
            {t.key: t.value for t in i.tags}["mlflow.data.context"],
            i.dataset.source,
        )
        for i in run.inputs.dataset_inputs
    }
    digest = registered["splits"].digest
    assert {name: value[:2] for name, value in inputs.items()} == {
        "train": (digest, "training"),
        "validation": (digest, "validation"),
        "test": (digest, "testing"),
    }
    assert str(registered["splits"].file("test.jsonl")) in inputs["test"][2]


def test_model_artifacts_stay_in_the_project_with_explicit_requirements(registered):
    requirements = list((registered["store"] / "mlartifacts").rglob("requirements.txt"))
    assert len(requirements) == 3
    text = requirements[0].read_text()
    assert "torch==" in text and "transformers==" in text and "torchvision" not in text
    assert all("+" not in pin for pin in model_requirements())


def test_cached_stage_registers_nothing_new(registered):
    trained, evaluated, ref = registered["refs"][2]
    again = run_register(registered["store"], registered["recipe"], registered["splits"], trained, evaluated)
    assert again == ref
    client = mlflow.MlflowClient(registered["recipe"].register.tracking_uri)
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 3


def test_model_is_logged_from_code_without_pickles_or_bundled_packages(registered):
    """Loading a version runs `chat_model.py` (readable source) and the installed tuneline: no
    cloudpickled `python_model.pkl`, no copy of tuneline put on sys.path."""
    artifacts = registered["store"] / "mlartifacts"
    assert not list(artifacts.rglob("*.pkl"))
    models = [path.parent for path in artifacts.rglob("MLmodel")]
    assert len(models) == 3
    for model_dir in models:
        assert (model_dir / "chat_model.py").is_file() and not (model_dir / "code").exists()
        flavor = (model_dir / "MLmodel").read_text()
        assert "model_code_path:" in flavor and "code: null" in flavor


def test_champion_reloads_by_alias_in_a_fresh_process_with_the_same_replies(registered):
    recipe = registered["recipe"]
    script = textwrap.dedent(f"""
        import json, sys
        from tuneline.register.stage import load_registered
        model = load_registered("models:/{MODEL_NAME}@champion", {recipe.register.tracking_uri!r})
        print(json.dumps(list(model.predict(json.load(sys.stdin)))))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(CONVERSATIONS),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    replies = json.loads(result.stdout.strip().splitlines()[-1])
    folder = registered["refs"][2][0].file("model")
    model, tokenizer = load_model(folder), load_tokenizer(ModelSpec(name=str(folder)))
    expected = generate_replies(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
    assert replies == expected and any(replies)


@pytest.mark.parametrize(
    ("metric", "candidate", "champion", "champion_version", "promoted"),
    [
        ("exact_match", 0.5, None, None, True),  # no champion yet
        ("exact_match", 0.56, 0.5, "1", True),
        ("exact_match", 0.55, 0.5, "1", False),  # not *more* than the margin
        ("exact_match", None, 0.5, "1", False),  # no evaluation result: never promoted
        ("exact_match", 0.9, None, "1", False),  # a champion without the metric is not compared
        ("loss", 1.0, 1.2, "1", True),  # lower is better
        ("loss", 1.2, 1.0, "1", False),
    ],
)
def test_promotion_rule(metric, candidate, champion, champion_version, promoted):
    decision, reason = decide_promotion(metric, candidate, champion, 0.05, champion_version)
    assert decision is promoted and reason


def test_long_params_are_cut_to_mlflow_limit():
    cut = truncate_params({"a": "x" * 7000, "b": "short"})
    assert len(cut["a"]) == MAX_PARAM_CHARS and cut["a"].endswith("...[truncated]") and cut["b"] == "short"


def test_run_holds_the_funnel_json(registered):
    stats = read_stats(registered["refs"][0][2])
    path = mlflow.artifacts.download_artifacts(
        run_id=stats["run_id"],
        artifact_path="funnel.json",
        tracking_uri=registered["recipe"].register.tracking_uri,
    )
    funnel = json.loads(Path(path).read_text())["funnel"]
    assert funnel == [{"stage": "split", "in": 0, "out": 0, "dropped": {}}]


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_loading_refuses_a_pickled_model(registered):
    """A version whose code is a cloudpickle (as Tuneline logged models before) is not unpickled by
    `load_registered` unless the user turns MLflow's switch on."""
    with mlflow.start_run(experiment_id=read_stats(registered["refs"][0][2])["experiment_id"]):
        mlflow.pyfunc.log_model(name="echo", python_model=Echo(), registered_model_name="pickled")
    with pytest.raises(mlflow.MlflowException, match="Deserializing model using pickle is disallowed"):
        load_registered("models:/pickled/1", registered["recipe"].register.tracking_uri)


@pytest.mark.parametrize(("index", "reused", "expected"), [
    (0, False, "this run set: candidate, champion (no champion yet)"),
    (1, False, "this run set: candidate (tuned_exact_match 0.4 vs champion v1 0.5"),
    (1, True, "an earlier run registered it and set: candidate (tuned_exact_match 0.4"),
])  # fmt: skip
def test_the_run_prints_the_aliases_its_stage_set(registered, index, reused, expected):
    """After version 3 took both aliases, version 2's run still says what it did: set candidate."""
    stats = read_stats(registered["refs"][index][2])
    report = {
        "funnel": [],
        "stage_dirs": {"register": ""},
        "registry": stats,
        "reused": ["register"] * reused,
    }
    console = Console(record=True, width=400)
    print_report(report, registered["recipe"], "http://127.0.0.1:4200", console)
    line = next(line for line in console.export_text().splitlines() if "registered" in line)
    assert f"models:/{MODEL_NAME}/{index + 1}; aliases {expected}" in line


def test_a_registration_that_decides_after_a_newer_one_leaves_candidate_there(tmp_path):
    """Version 2 decided first (champion, candidate); version 1 decides after it and sets no alias,
    and its printed line says so."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", str(tmp_path))
    newer = settle_version(client, "m", "2", "exact_match", 0.5, 0.0)
    older = settle_version(client, "m", "1", "exact_match", 0.9, 0.0)
    assert newer.aliases == ("candidate", "champion") and newer.reason == "no champion yet"
    assert older.aliases == () and older.champion_before == "2" and not older.promoted
    assert "champion version 2 has no tuned_exact_match" in older.reason
    assert {a: str(v) for a, v in client.get_registered_model("m").aliases.items()} == {
        "candidate": "2",
        "champion": "2",
    }
    stats = {"promoted": older.promoted, "aliases": list(older.aliases), "reason": older.reason}
    assert registry_line(stats, reused=False).startswith("aliases this run set: none (a newer version")
    assert settle_version(client, "m", "1", "exact_match", 0.9, 0.0) == older  # decided once
