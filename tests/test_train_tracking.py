"""Training is tracked: MLflow run with per-step metrics, params, log and curve; the register stage
can reuse the run, and falls back to a new one when the store was wiped."""

from __future__ import annotations

import pytest
from train_fixtures import make_split_and_model, small_spec

from tuneline.experiment import TrackingTarget
from tuneline.register.stage import reusable_run_id
from tuneline.store import read_stats
from tuneline.train import layout, tracking
from tuneline.train import stage as train


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("tracked")
    splits, model = make_split_and_model(root)
    target = TrackingTarget(f"sqlite:///{root}/mlflow.db", "tuneline-test", "tracked-run")
    console: list[str] = []  # what the task's log (the Prefect UI) shows
    ref = train.run_train(root / "art", splits, model, small_spec(), tracking=target, echo=console.append)
    client = mlflow.MlflowClient(target.tracking_uri)
    stats = read_stats(ref)
    return {"root": root, "target": target, "ref": ref, "stats": stats, "client": client, "console": console}


def test_the_tasks_log_shows_each_logging_step_with_loss_pace_and_time_left(tracked):
    import re

    steps = [line for line in tracked["console"] if line.startswith("training step")]
    assert len(steps) == 3, tracked["console"]
    pattern = r"training step {}/3, loss [0-9.e+-]+, [0-9]+ tokens/s(, [0-9]+:[0-9]{{2}} left)?"
    for number, line in enumerate(steps, 1):
        assert re.fullmatch(pattern.format(number), line), line
    assert "left" in steps[0] and "left" not in steps[-1]
    assert tracked["console"][0].startswith("training started") and "ended" in tracked["console"][-1]


def test_every_logging_step_reaches_mlflow(tracked):
    client, run_id = tracked["client"], tracked["stats"]["mlflow_run_id"]
    for key in ("loss", "learning_rate", "tokens_per_second", "memory_mb"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
        assert all(m.value > 0 for m in history), key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-run"
    assert run.data.metrics["train_steps"] == 3


def test_run_holds_log_curve_and_resolved_method(tracked):
    client, run_id = tracked["client"], tracked["stats"]["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"train.log", "loss_curve.png"}
    params = client.get_run(run_id).data.params
    assert params["peft.default.r"] == "4" and params["peft.default.lora_alpha"] == "8"
    assert params["sft.max_steps"] == "3" and params["loss_mode"] == "assistant_only"
    assert params["method.name"] == "lora" and params["peft.default.task_type"] == "CAUSAL_LM"
    log = tracked["ref"].file("train.log").read_text()
    assert "training started; 3 steps in all" in log and "step 3: " in log and "tokens_per_second=" in log


def test_register_reuses_the_run_unless_the_store_was_wiped(tracked, tmp_path):
    import mlflow

    client, stats = tracked["client"], tracked["stats"]
    experiment_id = client.get_run(stats["mlflow_run_id"]).info.experiment_id
    assert reusable_run_id(client, stats, experiment_id) == stats["mlflow_run_id"]
    wiped = mlflow.MlflowClient(f"sqlite:///{tmp_path}/empty.db")
    assert reusable_run_id(wiped, stats, experiment_id) is None
    assert reusable_run_id(client, {"mlflow_run_id": None}, experiment_id) is None


def test_a_resumed_training_keeps_its_run(tracked, tmp_path):
    target = tracked["target"]
    first = tracking.open_run(target, tmp_path, tmp_path)
    assert tracking.open_run(target, tmp_path, tmp_path) == first
    elsewhere = TrackingTarget(f"sqlite:///{tmp_path}/other.db", "tuneline-test", "r")
    assert tracking.open_run(elsewhere, tmp_path, tmp_path) != first  # the old store is gone


def test_prefect_summary_shows_the_numbers_and_the_log_end(tracked):
    text = tracked["ref"].file("train.log").read_text()
    markdown = layout.training_markdown(tracked["stats"], text, tail_lines=2)
    assert f"| MLflow run | {tracked['stats']['mlflow_run_id']} |" in markdown
    assert "training ended at step 3" in markdown and "training started" not in markdown
    assert layout.image_data_url(tracked["ref"].file("loss_curve.png")).startswith(
        "data:image/png;base64,iVBOR"
    )


def test_a_failed_training_marks_its_run_failed_and_the_rerun_finishes_it(tmp_path, monkeypatch):
    import mlflow
    from trl import SFTTrainer

    splits, model = make_split_and_model(tmp_path)
    target = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "tuneline-test", "failing")

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patched:
        patched.setattr(SFTTrainer, "train", out_of_memory)
        with pytest.raises(RuntimeError, match="simulated"):
            train.run_train(tmp_path / "art", splits, model, small_spec(), tracking=target)
    client = mlflow.MlflowClient(target.tracking_uri)
    [failed] = client.search_runs(client.get_experiment_by_name("tuneline-test").experiment_id)
    assert failed.info.status == "FAILED"

    stats = read_stats(train.run_train(tmp_path / "art", splits, model, small_spec(), tracking=target))
    assert stats["mlflow_run_id"] == failed.info.run_id
    assert client.get_run(failed.info.run_id).info.status == "FINISHED"
