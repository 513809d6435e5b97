"""The benchmarks stages: lm-eval tasks in-process on base and tuned model, cached per model and task.

Tiny Llama models and the tiny multiple-choice tasks of tests/benchmarks (six rows of local data);
the interop test runs lm-eval's own arc_easy on the shared ARC slice, offline, through data_files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tuneline import models
from tuneline.errors import UserError
from tuneline.evaluate import benchmarks
from tuneline.recipe import BenchmarkSpec, EvaluateSpec, ModelSpec, validate_recipe
from tuneline.store import check_ledger, find_stage, iter_records, read_stats, write_stage

TASKS_DIR = Path(__file__).resolve().parent / "benchmarks"
TINY_DATA = TASKS_DIR / "tiny_mc.jsonl"
SHARED_ARC = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "arc_easy" / "validation.jsonl"
)


def corpus() -> list[str]:
    rows = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines()]
    return [row["question"] + " " + " ".join(row["choices"]) for row in rows] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base model folder and two train stages (different tuned models) in a store of their own."""
    root = tmp_path_factory.mktemp("benchmarks")
    size = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    base = models.make_tiny_model(root / "base", corpus(), **size)
    for seed in (1, 2):
        with write_stage(root / "models", "train", f"tuned{seed}") as writer:
            models.make_tiny_model(writer.path("model"), corpus(), seed=seed, **size)
    return {
        "base": ModelSpec(name=str(base)),
        "tuned": find_stage(root / "models", "train", "tuned1"),
        "retrained": find_stage(root / "models", "train", "tuned2"),
    }


@pytest.fixture
def loads(monkeypatch):
    """Every model folder the stages load, in order."""
    loaded: list[str] = []
    original = models.load_trained

    def counting(name_or_path, **kwargs):
        loaded.append(str(name_or_path))
        return original(name_or_path, **kwargs)

    monkeypatch.setattr(models, "load_trained", counting)
    return loaded


def tiny_tasks(data: Path = TINY_DATA) -> EvaluateSpec:
    """tiny_mc on `data` (its rows as data_files) and tiny_cloze on 4 rows of the file its YAML names."""
    return EvaluateSpec(
        batch_size=4,
        benchmarks=[
            {"task": "tiny_mc", "include_path": str(TASKS_DIR), "data_files": {"validation": str(data)}},
            {"task": "tiny_cloze", "include_path": str(TASKS_DIR), "limit": 4},
        ],
    )


@pytest.fixture
def in_repo(monkeypatch):
    """tiny_cloze's YAML names its data relative to the project folder, as lm-eval reads it."""
    monkeypatch.chdir(TASKS_DIR.parents[1])


def test_scores_base_and_tuned_in_process_loading_each_model_once(tiny, loads, in_repo, tmp_path):
    compared = benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], tiny_tasks())

    assert loads == [tiny["base"].name, str(tiny["tuned"].dir / "model")]  # two tasks, one load a side
    stats = read_stats(compared)
    assert list(stats["tasks"]) == ["tiny_mc", "tiny_cloze"]
    mc, cloze = stats["tasks"]["tiny_mc"], stats["tasks"]["tiny_cloze"]
    assert (mc["metric"], mc["n"], mc["limit"]) == ("acc_norm", 6, None)
    assert (cloze["metric"], cloze["n"], cloze["limit"]) == ("acc", 4, 4)  # tiny_cloze reports acc only
    for row in stats["tasks"].values():
        assert 0 <= row["base"] <= 1 and 0 <= row["tuned"] <= 1
        assert row["change"] == pytest.approx(row["tuned"] - row["base"])
        assert row["base_stderr"] is not None and row["num_fewshot"] == 0
    check_ledger(compared)
    # Each side and task is a stage of its own: every scored document with its scores.
    for digest in stats["stages"]["base"] + stats["stages"]["tuned"]:
        scored = find_stage(tmp_path, "benchmark", digest)
        rows = list(iter_records(scored, benchmarks.SAMPLES))
        assert len(rows) == read_stats(scored)["n"] == check_ledger(scored)["out"]
        assert {"acc"} <= set(rows[0]["scores"]) and len(rows[0]["responses"]) == 3  # one per choice
    table = benchmarks.table_rows(stats)
    assert [row["task"] for row in table] == ["tiny_mc", "tiny_cloze"]
    assert table[1]["change"] == f"{100 * cloze['change']:+.1f}" and " ± " in table[1]["base"]


def test_a_second_run_loads_no_model_and_a_new_tuned_model_reuses_the_base_scores(
    tiny, loads, in_repo, tmp_path
):
    spec = tiny_tasks()
    first = benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], spec)
    loads.clear()

    assert benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], spec) == first
    assert loads == []

    retrained = benchmarks.run_benchmarks(tmp_path, tiny["retrained"], tiny["base"], spec)
    assert loads == [str(tiny["retrained"].dir / "model")]  # the base model's scores were reused
    before, after = read_stats(first), read_stats(retrained)
    assert after["stages"]["base"] == before["stages"]["base"]
    assert after["stages"]["tuned"] != before["stages"]["tuned"]
    assert [row["base"] for row in after["tasks"].values()] == [
        row["base"] for row in before["tasks"].values()
    ]


def test_editing_the_data_reruns_the_task(tiny, loads, in_repo, tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    shutil.copy(TINY_DATA, data)
    spec = EvaluateSpec(benchmarks=tiny_tasks(data).benchmarks[:1])
    first = benchmarks.run_benchmarks(tmp_path / "art", tiny["tuned"], tiny["base"], spec)
    data.write_text("".join(TINY_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:5]))
    loads.clear()

    second = benchmarks.run_benchmarks(tmp_path / "art", tiny["tuned"], tiny["base"], spec)

    assert len(loads) == 2 and second.digest != first.digest
    assert read_stats(first)["tasks"]["tiny_mc"]["n"] == 6
    assert read_stats(second)["tasks"]["tiny_mc"]["n"] == 5


def test_an_unknown_task_is_a_clear_error_before_any_model_loads(tiny, loads, tmp_path):
    spec = EvaluateSpec(benchmarks=[{"task": "arc_easy", "limit": 5}, {"task": "arc_eazy"}])
    with pytest.raises(UserError) as error:
        benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], spec)

    message = str(error.value)
    assert message.startswith("evaluate.benchmarks[1].task: 'arc_eazy' is not a task lm-eval 0.4")
    assert "(did you mean arc_easy," in message and "`lm-eval ls tasks`" in message
    assert loads == []
    assert not (tmp_path / "stages" / "benchmark").exists()
    with pytest.raises(UserError, match=r"evaluate.benchmarks\[1\].task: 'arc_eazy' is not a task"):
        benchmarks.check_benchmarks(spec.benchmarks)  # what the flow runs first, before any stage


@pytest.mark.parametrize(
    ("benchmark", "expected"),
    [
        (
            {"task": "tiny_mc", "data_files": {"valid": str(TINY_DATA)}},
            "evaluate.benchmarks[0].data_files: task tiny_mc scores the split validation "
            "(validation_split: validation), but data_files names valid; key each file by one of the "
            "task's splits, e.g. {validation: path/to/file.jsonl}",
        ),
        (
            {"task": "tiny_mc", "data_files": {"validation": "no/such.jsonl"}},
            "evaluate.benchmarks[0].data_files.validation: file no/such.jsonl not found",
        ),
        (
            {"task": "tiny_mc", "include_path": "no/such/folder"},
            "evaluate.benchmarks[0].include_path: folder no/such/folder not found",
        ),
    ],
)
def test_data_that_does_not_fit_names_the_field(tiny, loads, tmp_path, benchmark, expected):
    spec = EvaluateSpec(benchmarks=[{"include_path": str(TASKS_DIR)} | benchmark])
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], spec)
    assert loads == []


def test_a_base_model_is_keyed_by_its_content_not_its_path(tmp_path):
    with write_stage(tmp_path / "art", "base_model", "b1") as writer:
        writer.path("model").mkdir()
        (writer.path("model") / "config.json").write_text("{}")
    dequantized = find_stage(tmp_path / "art", "base_model", "b1").file("model")
    assert benchmarks.model_identity(tmp_path, ModelSpec(name=str(dequantized))) == "base_model:b1"
    folder, copy = tmp_path / "model", tmp_path / "copy"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    shutil.copytree(folder, copy)
    identity = benchmarks.model_identity(tmp_path, ModelSpec(name=str(folder)))
    assert identity.startswith("folder:") and identity == benchmarks.model_identity(
        tmp_path, ModelSpec(name=str(copy))
    )
    (copy / "config.json").write_text('{"hidden_size": 8}')
    assert benchmarks.model_identity(tmp_path, ModelSpec(name=str(copy))) != identity
    assert (
        benchmarks.model_identity(tmp_path, ModelSpec(name="org/model", revision="v1")) == "hub:org/model@v1"
    )


@pytest.mark.parametrize(
    ("metric", "reported", "chosen"),
    [
        (None, ["acc", "acc_norm"], "acc_norm"),
        (None, ["acc"], "acc"),
        (None, ["exact_match,strict-match", "exact_match,flexible-extract"], "exact_match,strict-match"),
        ("acc", ["acc", "acc_norm"], "acc"),
    ],
)
def test_the_compared_metric_is_acc_norm_then_acc_then_the_first(metric, reported, chosen):
    benchmark = BenchmarkSpec(task="some_task", metric=metric)
    assert benchmarks.headline_metric(benchmark, dict.fromkeys(reported, {}), 0) == chosen


def test_a_metric_the_task_does_not_report_names_the_field():
    with pytest.raises(UserError) as error:
        benchmarks.headline_metric(
            BenchmarkSpec(task="arc_easy", metric="f1"), {"acc": {}, "acc_norm": {}}, 2
        )
    assert str(error.value) == (
        "evaluate.benchmarks[2].metric: task arc_easy reports acc, acc_norm, not 'f1'; "
        "name one of those, or leave metric out"
    )


def test_lm_eval_result_keys_become_metrics_with_their_stderr():
    row = {
        "alias": "gsm8k",
        "acc,none": 0.5,
        "acc_stderr,none": 0.1,
        "acc_norm,none": 0.25,
        "acc_norm_stderr,none": "N/A",
        "exact_match,strict-match": 0.2,
        "exact_match_stderr,strict-match": 0.05,
    }
    assert benchmarks.task_scores(row) == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "acc_norm": {"value": 0.25, "stderr": None},
        "exact_match,strict-match": {"value": 0.2, "stderr": 0.05},
    }


def test_the_recipe_lists_each_benchmark_once_and_the_schema_describes_them():
    with pytest.raises(UserError, match=r"evaluate: .*benchmarks: arc_easy listed more than once"):
        validate_recipe(
            {
                "name": "x",
                "sources": [{"name": "s", "kind": "file", "path": "data.jsonl"}],
                "model": {"name": "m"},
                "evaluate": {"benchmarks": [{"task": "arc_easy"}, {"task": "arc_easy", "limit": 5}]},
                "register": {"model_name": "m"},
            }
        )
    schema = EvaluateSpec.model_json_schema()
    assert "lm-evaluation-harness" in schema["properties"]["benchmarks"]["description"]
    fields = schema["$defs"]["BenchmarkSpec"]["properties"]
    assert set(fields) == {"task", "limit", "num_fewshot", "metric", "data_files", "include_path"}
    assert all(field.get("description") for field in fields.values())


@pytest.mark.skipif(
    not SHARED_ARC.is_file(), reason=f"no shared benchmark slices at {SHARED_ARC.parent.parent}"
)
def test_arc_easy_runs_offline_on_the_shared_slice_through_data_files(tiny, tmp_path):
    spec = EvaluateSpec(
        benchmarks=[{"task": "arc_easy", "limit": 10, "data_files": {"validation": str(SHARED_ARC)}}]
    )
    compared = benchmarks.run_benchmarks(tmp_path, tiny["tuned"], tiny["base"], spec)

    row = read_stats(compared)["tasks"]["arc_easy"]
    assert (row["metric"], row["n"], row["limit"]) == ("acc_norm", 10, 10)
    scored = find_stage(tmp_path, "benchmark", read_stats(compared)["stages"]["base"][0])
    first = json.loads(SHARED_ARC.read_text(encoding="utf-8").splitlines()[0])
    sample = next(iter_records(scored, benchmarks.SAMPLES))
    # The hub layout was read: the target is the answer key's position among the choice labels.
    assert sample["target"] == first["choices"]["label"].index(first["answerKey"])
    assert len(sample["responses"]) == len(first["choices"]["text"])
