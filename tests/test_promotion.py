"""Promotion that means something: the champion compared on this run's test split, guardrails that
refuse, the reasons on the version, and the examples side by side in the MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from register_fixtures import MODEL_NAME, evaluated_stats, fake_stage, make_store, trained_and_evaluated

from tuneline.recipe import Guardrails
from tuneline.register.champion import champion_model
from tuneline.register.stage import run_register
from tuneline.store import read_stats

PREDICTIONS = [
    {
        "id": "r1",
        "prompt": [
            {"role": "system", "content": "Label it."},
            {"role": "user", "content": "Where is my refund?"},
        ],
        "reference": "billing",
        "base": "I can help",
        "tuned": "billing",
        "champion": "refund",
    }
]


@pytest.fixture
def store(tmp_path):
    recipe, store, splits = make_store(tmp_path)
    trained, evaluated = trained_and_evaluated(store, "first", 0.5)
    first = read_stats(run_register(store, recipe, splits, trained, evaluated))
    assert first["promoted"] and first["version"] == "1"
    return {"recipe": recipe, "store": store, "splits": splits, "first_train": trained}


def client_for(recipe):
    return mlflow.MlflowClient(recipe.register.tracking_uri)


def test_the_champion_is_compared_on_this_runs_test_split(store):
    # The champion logged 0.5 on its own test split; on this run's it scores 0.3, the candidate 0.4.
    stats = evaluated_stats(0.4) | {"champion_version": "1", "champion": {"exact_match": 0.3}}
    trained = fake_stage(store["store"], "train", "t-second", {"steps": 3})
    evaluated = fake_stage(store["store"], "evaluate", "e-second", stats, {"predictions.jsonl": PREDICTIONS})
    result = read_stats(run_register(store["store"], store["recipe"], store["splits"], trained, evaluated))
    assert result["promoted"] and result["champion_rescored"]
    assert result["champion_metric_before"] == 0.3
    assert result["reason"].endswith("both scored on this run's test split")
    run = client_for(store["recipe"]).get_run(result["run_id"])
    assert run.data.metrics["champion_exact_match"] == 0.3


def test_without_a_rescored_champion_its_own_figure_is_used_and_said(store):
    trained, evaluated = trained_and_evaluated(store["store"], "second", 0.4)
    result = read_stats(run_register(store["store"], store["recipe"], store["splits"], trained, evaluated))
    assert not result["promoted"] and not result["champion_rescored"]
    assert "the champion's figure is from its own run's test split" in result["reason"]


def test_a_failed_guardrail_refuses_a_promotion_the_metric_allows(store):
    recipe = store["recipe"].model_copy(
        update={
            "register": store["recipe"].register.model_copy(
                update={"guardrails": Guardrails(max_regression=2.0, min_suite_pass_rate=0.5)}
            )
        }
    )
    stats = evaluated_stats(0.9)
    stats["tuned"]["suite_pass_rate"] = 0.75
    trained = fake_stage(store["store"], "train", "t-third", {"steps": 3})
    evaluated = fake_stage(store["store"], "evaluate", "e-third", stats)
    benchmarks = fake_stage(
        store["store"],
        "benchmarks",
        "b-third",
        {"tasks": {"arc_easy": {"metric": "acc", "base": 0.60, "tuned": 0.55, "change": -0.05}}},
    )
    ref = run_register(store["store"], recipe, store["splits"], trained, evaluated, [benchmarks])
    result = read_stats(ref)
    assert not result["promoted"] and result["aliases"] == ["candidate"]
    assert "beats it" in result["reason"]
    assert "promotion refused by guardrails: max_regression: FAILED" in result["reason"]
    assert "arc_easy 60.0 -> 55.0 (-5.0 points)" in result["reason"]
    assert [(c["name"], c["passed"]) for c in result["guardrails"]] == [
        ("max_regression", False),
        ("min_suite_pass_rate", True),
    ]
    client = client_for(recipe)
    tags = client.get_model_version(MODEL_NAME, result["version"]).tags
    assert tags["tuneline.promoted"] == "false"
    assert tags["tuneline.guardrails"].startswith("max_regression: FAILED")
    assert "min_suite_pass_rate: passed (tuned pass rate 0.750 >= 0.5)" in tags["tuneline.guardrails"]
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["benchmark_arc_easy_base"] == 0.60 and metrics["benchmark_arc_easy_tuned"] == 0.55
    assert str(client.get_registered_model(MODEL_NAME).aliases["champion"]) == "1"


def test_the_run_holds_the_examples_side_by_side(store):
    stats = evaluated_stats(0.4) | {"champion_version": "1", "champion": {"exact_match": 0.3}}
    trained = fake_stage(store["store"], "train", "t-fourth", {"steps": 3})
    evaluated = fake_stage(store["store"], "evaluate", "e-fourth", stats, {"predictions.jsonl": PREDICTIONS})
    result = read_stats(run_register(store["store"], store["recipe"], store["splits"], trained, evaluated))
    path = mlflow.artifacts.download_artifacts(
        run_id=result["run_id"],
        artifact_path="examples.json",
        tracking_uri=store["recipe"].register.tracking_uri,
    )
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["id", "prompt", "reference", "base", "tuned", "champion"]
    assert table["data"] == [["r1", "Where is my refund?", "billing", "I can help", "billing", "refund"]]


def test_the_champions_model_is_found_in_the_store_or_downloaded(store):
    recipe, artifacts = store["recipe"], store["store"]
    other = fake_stage(artifacts, "train", "t-other", {"steps": 3})
    found = champion_model(artifacts, recipe.register, other)
    assert found.version == "1" and found.train_digest == store["first_train"].digest
    assert found.model.name == str(store["first_train"].dir / "model")
    assert champion_model(artifacts, recipe.register, store["first_train"]) is None  # the same model
    shutil.rmtree(store["first_train"].dir)  # the store was tidied: the registry still has it
    assert champion_model(artifacts, recipe.register, other).model.name == str(
        artifacts / "cache" / "champions" / MODEL_NAME / "v1" / "artifacts" / "model"
    )
    assert json.loads(
        (artifacts / "cache/champions" / MODEL_NAME / "v1/artifacts/model/config.json").read_text()
    )


def test_no_store_no_champion(tmp_path):
    recipe, store, _ = make_store(tmp_path)
    trained = fake_stage(store, "train", "t-x", {"steps": 1})
    assert champion_model(store, recipe.register, trained) is None
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()


def test_the_run_report_shows_the_champion_row_and_each_guardrail():
    from tuneline.report import render_markdown

    evaluation = evaluated_stats(0.4) | {
        "champion_version": "1",
        "champion": {"loss": 2.0, "exact_match": 0.3},
    }
    registry = {
        "model_uri": f"models:/{MODEL_NAME}/2",
        "run_id": "r",
        "promoted": False,
        "aliases": ["candidate"],
        "reason": "tuned_exact_match 0.4 vs champion v1 0.3: beats it; promotion refused by guardrails: ...",
        "guardrails": [
            {"name": "min_suite_pass_rate", "passed": False, "detail": "tuned pass rate 0.2 < 0.5"}
        ],
    }
    text = render_markdown({"funnel": [], "stage_dirs": {}, "evaluation": evaluation, "registry": registry})
    assert "## Base, tuned and champion (v1) on the test split (4 examples)" in text
    assert "| champion | 2.000 | 0.300 |" in text
    assert "- guardrail min_suite_pass_rate: FAILED (tuned pass rate 0.2 < 0.5)" in text


def test_peoples_ratings_are_tags_on_every_rated_version(store):
    second = fake_stage(store["store"], "train", "t-rated", {"steps": 3})
    evaluated = fake_stage(store["store"], "evaluate", "e-rated", evaluated_stats(0.6))
    first = f"tuned:{store['first_train'].digest}"
    leaderboard = [
        {"model": "tuned:t-rated", "elo": 1100.4, "bt": 1150.2, "ci_low": 1090.0, "ci_high": 1210.9},
        {"model": first, "elo": 990, "bt": 1000, "ci_low": 950, "ci_high": 1050},
        {"model": "base:tiny", "elo": 910, "bt": 850, "ci_low": 790, "ci_high": 900},
    ]
    compared = fake_stage(
        store["store"],
        "compare",
        "c-rated",
        {"pairs": {"base": {"win_rate": 0.9}}, "leaderboard": leaderboard},
    )
    ref = run_register(store["store"], store["recipe"], store["splits"], second, evaluated, [compared])
    client = client_for(store["recipe"])
    new = client.get_model_version(MODEL_NAME, read_stats(ref)["version"]).tags
    assert (new["tuneline.bt"], new["tuneline.bt_ci"], new["tuneline.rank"]) == (
        "1150",
        "1090-1211",
        "1 of 3",
    )
    old = client.get_model_version(MODEL_NAME, "1").tags
    assert (old["tuneline.elo"], old["tuneline.rank"]) == ("990", "2 of 3")
    metrics = client.get_run(read_stats(ref)["run_id"]).data.metrics
    assert metrics["human_win_rate_vs_base"] == 0.9
