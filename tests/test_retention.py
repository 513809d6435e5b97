"""Retention: expired trained models go with the stages built from them and their MLflow versions;
aliases, exports, youth and live runs keep them; data stages are never touched.

The store holds registered tiny models whose train stages finished on set dates (their manifests'
`finished_at`), and the clock is injected: `now` is 2026-12-06, retention 15 days.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from register_fixtures import MODEL_NAME, TRAIN_STATS, evaluated_stats, make_store
from typer.testing import CliRunner

from tuneline.cli.main import app
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
# name -> (tuned exact match, finished_at); registered in this order, the first becomes champion
MODELS = {
    "champ": (0.5, OLD),
    "old": (0.4, OLD),
    "tagged": (0.3, OLD),
    "listed": (0.2, OLD),
    "young": (0.1, YOUNG),
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


@pytest.fixture
def project(tmp_path):
    """Five registered models (see MODELS), the old one with evaluate, benchmarks, the tuned side's
    benchmark stage and a judge built from it; two pretrain stages (one the base of the young
    model's adapter); a collect stage and a base_model stage."""
    recipe, store, splits = make_store(tmp_path)
    collected = stage(store, "collect", "c1", {"sources": 1})
    stage(store, "base_model", "bm1", {"model": "base"})
    refs = {}
    for name, (score, finished) in MODELS.items():
        trained = stage(store, "train", f"t-{name}", TRAIN_STATS, [splits], copy_model=True)
        evaluated = stage(store, "evaluate", f"e-{name}", evaluated_stats(score), [splits, trained])
        registered = run_register(store, recipe, splits, trained, evaluated)
        set_finished_at(trained, finished)
        refs[name] = {"train": trained, "evaluate": evaluated, "register": registered}
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
    export = {"train_digest": "t-listed", "version": "4", "format": "merged", "to": "/exports/v4", "at": OLD}
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
        "t-listed": ["exported (merged to /exports/v4)"],
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
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")] == [
        "5",
        "4",
        "3",
        "1",
    ]
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


def test_a_live_run_keeps_the_model_it_holds(project):
    store = project["store"]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with stage_lock(store, "evaluate", "e-old"):  # a run writing or waiting on this stage
            held.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait(30)
    try:
        report = apply_retention(plan_of(project))
    finally:
        release.set()
        worker.join()
    old = by_digest(report.kept)["t-old"]
    assert old.reasons == ["in use (a run holds or writes evaluate e-old)"]
    assert find_stage(store, "train", "t-old") is not None


def test_a_crashed_removal_is_finished_by_the_next_run(project):
    store = project["store"]
    folder = store / "stages" / "pretrain" / "p-unused"
    crashed = folder.with_name(f"{TMP_PREFIX}p-unused-0badc0de")
    folder.rename(crashed)  # killed right after the rename, before the delete
    report = apply_retention(plan_of(project))
    assert not crashed.exists() and report.temporaries_cleared == 1
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
    assert listed[f"models:/{MODEL_NAME}/5"] == plan["t-young"].expires.date().isoformat() == "2026-12-15"
    assert listed[f"models:/{MODEL_NAME}/1"] == listed[f"models:/{MODEL_NAME}/3"] == "kept"
    assert listed[f"models:/{MODEL_NAME}/4"] == "kept"  # exports.jsonl keeps it, as retention does
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


def test_a_broken_exports_line_stops_retention_naming_the_line(project):
    with open(project["store"] / EXPORTS_FILE, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(Exception, match=r"exports.jsonl:2: not an export line"):
        plan_of(project)


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
