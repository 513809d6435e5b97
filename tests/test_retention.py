"""Retention: expired trained models go with the stages built from them and their MLflow versions;
aliases, exports, youth and live runs keep them; data stages are never touched.

The store holds registered tiny models whose train stages finished on set dates (their manifests'
`finished_at`), and the clock is injected: `now` is 2026-12-06, retention 15 days.
"""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from register_fixtures import MODEL_NAME, TRAIN_STATS, evaluated_stats, make_recipe, make_store
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.errors import UserError
from tuneline.recipe import RETENTION_DAYS
from tuneline.register.retention import (
    EXPORTS_FILE,
    REMOVED_TAG,
    apply_retention,
    plan_retention,
)
from tuneline.register.run_details import EXPORTED_TAG
from tuneline.register.stage import run_register
from tuneline.store import TMP_PREFIX, StageRef, find_stage, remove_stale_temporaries, stage_lock, write_stage

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
OLD = "2026-11-01T09:00:00+00:00"  # 35 days before NOW: expired on 2026-11-16
YOUNG = "2026-11-30T09:00:00+00:00"  # 6 days before NOW: expires on 2026-12-15
# name -> (tuned exact match, finished_at, registered): versions 1-3 in this order (the first is
# champion); `listed` is exported as a train stage folder (exports.jsonl), `young` is not registered.
MODELS = {
    "champ": (0.5, OLD, True),
    "old": (0.4, OLD, True),
    "tagged": (0.3, OLD, True),
    "listed": (0.2, OLD, False),
    "young": (0.1, YOUNG, False),
}


def stage(store: Path, name: str, digest: str, stats: dict, inputs=(), copy_model: bool = False) -> StageRef:
    """A finished stage with these stats and inputs (its manifest's links)."""
    with write_stage(store, name, digest, list(inputs)) as writer:
        writer.stats = stats
        if copy_model:
            shutil.copytree(store / "tiny-model", writer.path("model"))
    return find_stage(store, name, digest)


def set_finished_at(ref: StageRef, when: str) -> None:
    """Pretend a stage finished at `when` (the manifest's `finished_at`, which retention reads)."""
    path = ref.file("manifest.json")
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "finished_at": when}, indent=2))


def data_listing(store: Path) -> dict[str, bytes]:
    """Every file of the data stages and the base model, with its bytes."""
    return {
        str(path.relative_to(store)): path.read_bytes()
        for kind in ("collect", "split", "base_model")
        for path in sorted((store / "stages" / kind).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """register_fixtures.make_store's store and an empty MLflow database, built once: each test
    copies them (building the tiny model and MLflow's tables takes seconds)."""
    root = tmp_path_factory.mktemp("template")
    recipe, _, _ = make_store(root)
    mlflow.MlflowClient(recipe.register.tracking_uri).search_experiments()  # creates the tables
    return root


@pytest.fixture
def project(tmp_path, template):
    """Five trained models, three registered (see MODELS); the old one with evaluate, benchmarks,
    the tuned side's benchmark stage and a judge built from it; two pretrain stages (one the base
    of the young model's adapter); a collect stage and a base_model stage."""
    for folder in ("store", "mlflow"):
        shutil.copytree(template / folder, tmp_path / folder)
    recipe = make_recipe(tmp_path)
    store, splits = Path(recipe.artifacts_dir), find_stage(tmp_path / "store", "split", "s1")
    collected = stage(store, "collect", "c1", {"sources": 1})
    stage(store, "base_model", "bm1", {"model": "base"})
    refs = {}
    for name, (score, finished, registers) in MODELS.items():
        trained = stage(store, "train", f"t-{name}", TRAIN_STATS, [splits], copy_model=True)
        evaluated = stage(store, "evaluate", f"e-{name}", evaluated_stats(score), [splits, trained])
        refs[name] = {"train": trained, "evaluate": evaluated}
        if registers:
            refs[name]["register"] = run_register(store, recipe, splits, trained, evaluated)
        set_finished_at(trained, finished)
    benchmarks_stats = {"stages": {"base": ["bench-base"], "tuned": ["bench-old"]}}
    refs["old"]["benchmarks"] = stage(store, "benchmarks", "bs-old", benchmarks_stats, [refs["old"]["train"]])
    refs["old"]["benchmark"] = stage(store, "benchmark", "bench-old", {"task": "arc_easy"})
    stage(store, "benchmark", "bench-base", {"task": "arc_easy"})
    refs["old"]["judge"] = stage(store, "judge", "j-old", {"pairs": {}}, [refs["old"]["evaluate"]])
    for name in ("p-used", "p-unused"):
        set_finished_at(stage(store, "pretrain", name, {"steps": 1}, [collected], copy_model=True), OLD)
    adapter = refs["young"]["train"].dir / "adapter"
    adapter.mkdir()  # a LoRA adapter trained on the pretrain stage's model names it as its base
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(store / "stages" / "pretrain" / "p-used" / "model")})
    )
    client = mlflow.MlflowClient(recipe.register.tracking_uri)
    client.set_model_version_tag(MODEL_NAME, "3", EXPORTED_TAG, "gguf to /exports/v3")
    client.delete_registered_model_alias(MODEL_NAME, "candidate")  # only the champion alias is left
    export = {"train_digest": "t-listed", "version": None, "format": "merged", "to": "/exports/t", "at": OLD}
    (store / EXPORTS_FILE).write_text(json.dumps(export) + "\n")
    return {"recipe": recipe, "store": store, "refs": refs, "client": client}


def plan_of(project, now: datetime = NOW):
    recipe = project["recipe"]
    return plan_retention(project["store"], recipe.register.tracking_uri, RETENTION_DAYS, now)


def by_digest(entries) -> dict:
    return {entry.digest: entry for entry in entries}


def test_dry_run_lists_what_would_go_and_why_the_rest_stays_and_removes_nothing(project):
    store = project["store"]
    before = sorted(str(path.relative_to(store)) for path in (store / "stages").rglob("*"))
    report = apply_retention(plan_of(project), dry_run=True)
    assert report.dry_run
    assert sorted(entry.digest for entry in report.removed) == ["p-unused", "t-old"]
    old = by_digest(report.removed)["t-old"]
    assert old.reasons == ["expired 2026-11-16: no alias, not exported, not in use"]
    assert [(item.stage, item.digest) for item in old.stages] == [
        ("register", project["refs"]["old"]["register"].digest),
        ("judge", "j-old"),
        ("benchmarks", "bs-old"),
        ("benchmark", "bench-old"),
        ("evaluate", "e-old"),
    ]
    assert old.versions == [f"models:/{MODEL_NAME}/2"] and old.bytes > 0
    kept = {digest: entry.reasons for digest, entry in by_digest(report.kept).items()}
    assert kept == {
        "t-champ": [f"alias champion (models:/{MODEL_NAME}/1)"],
        "t-tagged": ["exported (gguf to /exports/v3)"],
        "t-listed": ["exported (merged to /exports/t)"],
        "t-young": ["young (expires 2026-12-15)"],
        "p-used": ["base of kept train t-young"],
    }
    assert report.bytes_freed == sum(entry.bytes for entry in report.removed)
    assert sorted(str(path.relative_to(store)) for path in (store / "stages").rglob("*")) == before
    assert str(project["client"].get_model_version(MODEL_NAME, "2").version) == "2"


def test_expired_model_goes_with_its_downstream_stages_and_version_the_rest_is_untouched(project):
    store, client, refs = project["store"], project["client"], project["refs"]
    data_before = data_listing(store)
    report = apply_retention(plan_of(project))
    assert sorted(entry.digest for entry in report.removed) == ["p-unused", "t-old"]
    assert report.versions_deleted == [f"models:/{MODEL_NAME}/2"]
    for ref in (*refs["old"].values(), find_stage(store, "pretrain", "p-unused")):
        assert ref is None or not ref.dir.exists()
    assert not (store / "stages" / "pretrain" / "p-unused").exists()
    assert not list(store.glob(f"stages/*/{TMP_PREFIX}*"))  # nothing half-removed left behind
    for name in ("champ", "tagged", "listed", "young"):
        assert all(ref.dir.is_dir() for ref in refs[name].values())
    assert find_stage(store, "benchmark", "bench-base") and find_stage(store, "pretrain", "p-used")
    assert data_listing(store) == data_before  # data stages and base model byte-identical
    left = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(version.version) for version in left) == [1, 3]
    removed_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`{REMOVED_TAG}` != ''"
    )
    assert len(removed_runs) == 1 and removed_runs[0].data.metrics["tuned_exact_match"] == 0.4  # metrics stay
    assert (
        removed_runs[0].data.tags[REMOVED_TAG].startswith("2026-12-06: retention removed train stage t-old")
    )
    assert report.bytes_freed > 0

    again = apply_retention(plan_of(project))  # idempotent: nothing more goes
    assert again.removed == [] and len(again.kept) == 5


@pytest.fixture
def bare(tmp_path):
    """A store without a registry: an old unregistered train stage with its evaluate stage, and an
    old pretrain stage nothing names."""
    store = tmp_path / "store"
    splits = stage(store, "split", "s1", {})
    trained = stage(
        store, "train", "t-old", {**TRAIN_STATS, "mlflow_run_id": "in-a-store-now-gone"}, [splits]
    )
    stage(store, "evaluate", "e-old", {}, [splits, trained])
    set_finished_at(trained, OLD)
    set_finished_at(stage(store, "pretrain", "p-unused", {}), OLD)
    tracking_uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    return {"store": store, "plan": lambda: plan_retention(store, tracking_uri, RETENTION_DAYS, NOW)}


@contextmanager
def lock_held_elsewhere(store, stage: str, digest: str):
    """A stage lock held by another thread for the block (filelock re-enters in its own thread)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with stage_lock(store, stage, digest):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait(30)
    try:
        yield
    finally:
        release.set()
        worker.join()


def test_a_live_run_keeps_the_model_it_holds(bare):
    store = bare["store"]
    with lock_held_elsewhere(store, "evaluate", "e-old"):  # a run writing or waiting on this stage
        report = apply_retention(bare["plan"]())
    old = by_digest(report.kept)["t-old"]
    assert old.reasons == ["in use (a run holds or writes evaluate e-old)"]
    assert find_stage(store, "train", "t-old") is not None


@pytest.mark.parametrize(
    ("writing", "removed"),
    [("evaluate", []), ("train", ["t-old"])],  # a training reads a pretrain stage, no train stage
)
def test_a_run_writing_a_stage_that_may_read_models_keeps_them(bare, writing, removed):
    store = bare["store"]
    (store / "stages" / writing / f"{TMP_PREFIX}new-1234abcd").mkdir()  # its inputs are unknown yet
    with lock_held_elsewhere(store, writing, "new"):
        report = apply_retention(bare["plan"]())
    assert [entry.digest for entry in report.removed] == removed
    assert by_digest(report.kept)["p-unused"].reasons == [f"in use (a run holds or writes {writing} new)"]


def test_an_export_made_after_the_plan_keeps_the_model(bare):
    plan = bare["plan"]()
    export = {"train_digest": "t-old", "version": None, "format": "gguf", "to": "/exports/x", "at": OLD}
    (bare["store"] / EXPORTS_FILE).write_text(json.dumps(export) + "\n")
    report = apply_retention(plan)
    assert [entry.digest for entry in report.removed] == ["p-unused"]
    assert by_digest(report.kept)["t-old"].reasons == ["exported (gguf to /exports/x)"]
    assert find_stage(bare["store"], "train", "t-old") is not None


def test_a_crashed_removal_is_finished_by_the_next_run(bare):
    store = bare["store"]
    folder = store / "stages" / "pretrain" / "p-unused"
    crashed = folder.with_name(f"{TMP_PREFIX}p-unused-0badc0de")
    folder.rename(crashed)  # killed right after the rename, before the delete
    report = apply_retention(bare["plan"]())
    assert not crashed.exists() and report.temporaries_cleared == 1
    assert [entry.digest for entry in report.removed] == ["t-old"]
    assert remove_stale_temporaries(store) == []


def test_runs_list_shows_the_expiry_retention_goes_by_and_then_removed(project):
    args = [
        "--artifacts-dir",
        str(project["store"]),
        "--tracking-uri",
        project["recipe"].register.tracking_uri,
    ]
    rows = json.loads(CliRunner().invoke(app, ["runs", "list", "--json", *args]).output)
    plan = by_digest(plan_of(project).entries)
    listed = {row["model_uri"]: row["expires"] for row in rows}
    assert listed[f"models:/{MODEL_NAME}/2"] == plan["t-old"].expires.date().isoformat() == "2026-11-16"
    assert listed[f"models:/{MODEL_NAME}/1"] == listed[f"models:/{MODEL_NAME}/3"] == "kept"
    apply_retention(plan_of(project))
    rows = json.loads(CliRunner().invoke(app, ["runs", "list", "--json", *args]).output)
    removed = [row for row in rows if row["status"] == "removed by retention"]
    assert [row["expires"] for row in removed] == ["removed on 2026-12-06"]


def test_cli_dry_run_table_then_json_run(project, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(json.dumps(project["recipe"].model_dump(mode="json", context={"resolved": True})))
    dry = CliRunner().invoke(
        app, ["retention", str(recipe_path), "--dry-run", "--now", "2026-12-06"], env={"COLUMNS": "250"}
    )
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and "t-old" in dry.output and "alias champion" in dry.output
    assert "young (expires 2026-12-15)" in dry.output
    assert find_stage(project["store"], "train", "t-old") is not None
    real = CliRunner().invoke(app, ["retention", str(recipe_path), "--now", "2026-12-06", "--json"])
    assert real.exit_code == 0, real.output
    report = json.loads(real.output)
    assert sorted(entry["digest"] for entry in report["removed"]) == ["p-unused", "t-old"]
    assert find_stage(project["store"], "train", "t-old") is None
    bad = CliRunner().invoke(app, ["retention", str(recipe_path), "--now", "next tuesday"])
    assert bad.exit_code == 2 and "--now 'next tuesday': not an ISO date" in bad.output


def test_a_broken_exports_line_stops_retention_naming_the_line(bare):
    (bare["store"] / EXPORTS_FILE).write_text('{"train_digest": "t-other"}\n{not json\n')
    with pytest.raises(UserError, match=r"exports.jsonl:2: not an export line .* Fix or remove the line"):
        bare["plan"]()


def test_the_retention_flow_removes_what_expired_and_publishes_a_table(project, prefect_server):
    from prefect.artifacts import Artifact
    from tuneline.flows.retention import retention

    dry = retention(project["recipe"], dry_run=True, now=NOW)
    assert sorted(entry["digest"] for entry in dry["removed"]) == ["p-unused", "t-old"]
    assert find_stage(project["store"], "train", "t-old") is not None
    done = retention(project["recipe"], now=NOW)
    assert done["dry_run"] is False and done["bytes_freed"] > 0
    assert find_stage(project["store"], "train", "t-old") is None
    table = Artifact.get("retention")
    assert table is not None and "t-old" in str(table.data) and "alias champion" in str(table.data)


@pytest.mark.slow
def test_after_retention_a_rerun_trains_again_instead_of_reading_a_missing_folder(tmp_path):
    """The chain the finetune flow runs (train, evaluate, register), for real on a tiny model: once
    retention removed it, the same inputs find no cached stage and train, evaluate and register anew."""
    from train_fixtures import QUESTIONS, conversation, small_spec

    from tuneline.evaluate.stage import run_evaluate
    from tuneline.models import make_tiny_model
    from tuneline.recipe import EvaluateSpec, ModelSpec, validate_recipe
    from tuneline.records import make_record
    from tuneline.train.stage import run_train

    store = tmp_path / "store"
    records = [make_record(conversation(q, label)) for label, qs in QUESTIONS.items() for q in qs]
    with write_stage(store, "split", "s0") as writer:
        for index, record in enumerate(records):
            writer.count_in()
            writer.keep(record, ("train.jsonl", "train.jsonl", "validation.jsonl", "test.jsonl")[index % 4])
    splits = find_stage(store, "split", "s0")
    corpus = [m["content"] for r in records for m in r["messages"]]
    base = make_tiny_model(
        tmp_path / "base", corpus, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    recipe = validate_recipe(
        {
            "name": "rerun",
            "artifacts_dir": str(store),
            "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
            "model": {"name": str(base)},
            "register": {"model_name": "rerun", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    model, evaluate = ModelSpec(name=str(base)), EvaluateSpec(max_new_tokens=2, batch_size=4, max_examples=2)

    def run_chain() -> tuple[StageRef, StageRef, dict]:
        trained = run_train(store, splits, model, small_spec(max_steps=2))
        evaluated = run_evaluate(store, splits, trained, model, evaluate)
        registered = run_register(store, recipe, splits, trained, evaluated)
        return trained, evaluated, json.loads(registered.file("stats.json").read_text())

    trained, evaluated, first = run_chain()
    trained_at = json.loads(trained.file("manifest.json").read_text())["finished_at"]
    client = mlflow.MlflowClient(recipe.register.tracking_uri)
    for alias in ("champion", "candidate"):  # as when newer versions took the aliases
        client.delete_registered_model_alias("rerun", alias)
    later = datetime.fromisoformat(trained_at) + timedelta(days=16)
    report = apply_retention(plan_retention(store, recipe.register.tracking_uri, RETENTION_DAYS, later))
    assert [entry.digest for entry in report.removed] == [trained.digest], report.kept
    assert not trained.dir.exists() and not evaluated.dir.exists()

    again, evaluated_again, second = run_chain()
    assert (again.digest, evaluated_again.digest) == (trained.digest, evaluated.digest)  # same recipe
    assert (again.dir / "model").is_dir() or (again.dir / "adapter").is_dir()  # trained anew
    assert json.loads(again.file("manifest.json").read_text())["finished_at"] >= trained_at
    assert (first["version"], second["version"]) == ("1", "2")  # registered anew; v1 went
