"""The register stage against a real MLflow tracking store (SQLite in a temp folder).

Three trained models go through `run_register` in order: the first becomes champion, a worse one
only becomes candidate, a clearly better one takes champion. The champion then reloads by alias in
a fresh process and answers exactly like the merged model folder it was logged from.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from tuneline.evaluate.stage import generate_replies
from tuneline.experiment import MAX_PARAM_CHARS, truncate_params
from tuneline.models import load_model, load_tokenizer, make_tiny_model
from tuneline.recipe import ModelSpec, dump_recipe, validate_recipe
from tuneline.records import make_record
from tuneline.register.stage import decide_promotion, model_requirements, run_register
from tuneline.store import find_stage, read_stats, write_stage

MODEL_NAME = "tiny-chat"
QUESTIONS = [
    "How do I reset my password?",
    "Where is my refund?",
    "Can I change my plan?",
    "Is the app down?",
]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]


def make_recipe(root: Path):
    return validate_recipe(
        {
            "name": "registry-test",
            "artifacts_dir": str(root / "store"),
            "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
            "model": {"name": "base", "chat_template": "{{ x }}" * 1200},  # a param longer than MLflow allows
            "evaluate": {"max_new_tokens": 6, "batch_size": 2},
            "register": {
                "model_name": MODEL_NAME,
                "tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                "margin": 0.05,
            },
        }
    )


def fake_stage(
    artifacts_dir: Path, stage: str, digest: str, stats: dict, files: dict[str, list] | None = None
):
    """A finished stage with these stats and JSONL files (no records through its ledger)."""
    with write_stage(artifacts_dir, stage, digest) as writer:
        for name, rows in (files or {}).items():
            writer.path(name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        writer.stats = stats
        if stage == "train":
            shutil.copytree(artifacts_dir / "tiny-model", writer.path("model"))
    return find_stage(artifacts_dir, stage, digest)


def evaluated_stats(tuned_exact_match: float) -> dict:
    return {
        "examples": 4,
        "metric": "exact_match",
        "base": {"loss": 6.1, "perplexity": 445.9, "exact_match": 0.0},
        "tuned": {"loss": 1.2, "perplexity": 3.3, "exact_match": tuned_exact_match},
    }


TRAIN_STATS = {
    "method": "lora",
    "steps": 3,
    "train_loss": 2.5,
    "seconds": 1.5,
    "log_history": [{"step": s, "loss": 3.0 - s / 2, "learning_rate": 1e-3} for s in (1, 2, 3)],
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Three registrations: first (0.5), worse (0.4), better by more than the margin (0.8)."""
    root = tmp_path_factory.mktemp("registry")
    recipe = make_recipe(root)
    store = Path(recipe.artifacts_dir)
    store.mkdir()
    make_tiny_model(
        store / "tiny-model", QUESTIONS * 5, vocab_size=320, hidden_size=32, num_layers=2, num_heads=4
    )
    records = [make_record([*c, {"role": "assistant", "content": "ok"}]) for c in CONVERSATIONS]
    splits = fake_stage(
        store,
        "split",
        "s1",
        {"counts": {"train": 2, "validation": 1, "test": 1}},
        {"train.jsonl": records[:2], "validation.jsonl": records[2:3], "test.jsonl": records[3:]},
    )
    refs = []
    for n, score in enumerate((0.5, 0.4, 0.8)):
        trained = fake_stage(store, "train", f"t{n}", TRAIN_STATS)
        evaluated = fake_stage(store, "evaluate", f"e{n}", evaluated_stats(score))
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
