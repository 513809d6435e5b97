"""A training killed mid-run resumes from its last complete checkpoint when the recipe runs again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from train_fixtures import make_split_and_model, small_spec

from tuneline.experiment import TrackingTarget
from tuneline.pipeline import train_key
from tuneline.store import find_stage, read_stats
from tuneline.train import stage as train

MAX_STEPS = 12
SAVE_STEPS = 3

# The killed run: the same run_train call, with each step slowed so the kill lands mid-run.
DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from tuneline.train import tracking
    from tuneline.train import stage as train
    from tuneline.recipe import ModelSpec, TrainSpec
    from tuneline.store import StageRef

    original = tracking.TrackingCallback.on_step_end
    def slow_step(self, *args, **kwargs):
        time.sleep(0.4)
        return original(self, *args, **kwargs)
    tracking.TrackingCallback.on_step_end = slow_step

    job = json.loads(open(sys.argv[1]).read())
    train.run_train(job["artifacts_dir"], StageRef(**job["splits"]), ModelSpec(**job["model"]),
                    TrainSpec(**job["train"]))
    """
)


# The killed tracked run: killed -9 by itself right after step KILL_AT reached MLflow, past the
# checkpoint at SAVE_STEPS, so the resumed run redoes steps the MLflow run already holds.
KILL_AT = 4
SELF_KILLING_DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from tuneline.experiment import TrackingTarget
    from tuneline.train import tracking
    from tuneline.train import stage as train
    from tuneline.recipe import ModelSpec, TrainSpec
    from tuneline.store import StageRef

    original = tracking.TrackingCallback.on_log
    def log_then_die(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == int(sys.argv[2]) and "loss" in (logs or {}):
            os.kill(os.getpid(), signal.SIGKILL)
    tracking.TrackingCallback.on_log = log_then_die

    job = json.loads(open(sys.argv[1]).read())
    train.run_train(job["artifacts_dir"], StageRef(**job["splits"]), ModelSpec(**job["model"]),
                    TrainSpec(**job["train"]), tracking=TrackingTarget(**job["tracking"]))
    """
)


def complete_checkpoints(work_dir: Path) -> list[int]:
    """Steps of the checkpoints whose trainer state is written (the last file a checkpoint gets)."""
    return sorted(int(p.parent.name.split("-")[1]) for p in work_dir.glob("checkpoint-*/trainer_state.json"))


@pytest.mark.slow
def test_killed_training_resumes_without_repeating_steps(tmp_path):
    splits, model = make_split_and_model(tmp_path)
    spec = small_spec(max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=2)
    artifacts_dir = tmp_path / "art"
    digest = train_key(model, spec, splits)
    work_dir = train.checkpoint_dir(artifacts_dir, digest)  # keyed by the stage digest
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "artifacts_dir": str(artifacts_dir),
                "splits": splits.model_dump(),
                "model": model.model_dump(),
                "train": spec.model_dump(mode="json"),
            }
        )
    )
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(train.__file__).parents[2])}  # the checkout's root
    process = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(job)], env=env)
    deadline = time.monotonic() + 240
    while not complete_checkpoints(work_dir):
        assert process.poll() is None, "the training process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert find_stage(artifacts_dir, "train", digest) is None  # killed: no stage
    reached = complete_checkpoints(work_dir)[-1]
    assert SAVE_STEPS <= reached < MAX_STEPS

    console: list[str] = []
    ref = train.run_train(artifacts_dir, splits, model, spec, echo=console.append)  # the same recipe again

    stats = read_stats(ref)
    assert stats["resumed_from_step"] == reached
    assert stats["steps"] == MAX_STEPS  # as many steps as an uninterrupted run
    assert stats["steps_run"] == MAX_STEPS - reached  # the checkpoint's steps were not run again
    log = ref.file("train.log").read_text()
    assert f"training resumed from step {reached}; {MAX_STEPS} steps in all" in log
    assert console[0] == f"training resumed from step {reached}; {MAX_STEPS} steps in all"  # the task's log
    logged_steps = [int(step) for step in re.findall(r"step (\d+): .*\bloss=", log)]
    before = [step for step in logged_steps if step <= reached]
    assert before == list(range(1, reached + 1))  # each finished step logged once, none redone
    assert [row["step"] for row in stats["log_history"]] == list(range(1, MAX_STEPS + 1))
    assert (ref.dir / "model" / "config.json").is_file() and (ref.dir / "adapter").is_dir()
    assert not work_dir.exists()  # checkpoints go once the stage is written


def test_last_complete_checkpoint_skips_and_removes_half_written_ones(tmp_path):
    for step, complete in ((3, True), (6, True), (9, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert train.last_complete_checkpoint(tmp_path, remove_partial=False) == tmp_path / "checkpoint-6"
    assert (tmp_path / "checkpoint-12").exists()
    assert train.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert train.last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow
def test_fresh_discards_checkpoints(tmp_path):
    splits, model = make_split_and_model(tmp_path)
    spec = small_spec(max_steps=2, save_steps=1, resume="fresh")
    work_dir = train.checkpoint_dir(tmp_path / "art", train_key(model, spec, splits))
    stale = work_dir / "checkpoint-1"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 1}))  # would break a resume
    stats = read_stats(train.run_train(tmp_path / "art", splits, model, spec))
    assert stats["resumed_from_step"] is None and stats["steps_run"] == 2


@pytest.mark.slow
def test_a_resumed_training_reports_the_whole_training(tmp_path):
    """Stats, token count and the MLflow run of a killed-and-resumed training equal an uninterrupted one's."""
    import mlflow

    splits, model = make_split_and_model(tmp_path)
    # Logging every 2 steps, checkpoints every 3: the checkpoint at 3 is not a logging step by itself.
    spec = small_spec(max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=2)
    target = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "resume-test", "resumed")
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "artifacts_dir": str(tmp_path / "resumed"),
                "splits": splits.model_dump(),
                "model": model.model_dump(),
                "train": spec.model_dump(mode="json"),
                "tracking": asdict(target),
            }
        )
    )
    (tmp_path / "driver.py").write_text(SELF_KILLING_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(train.__file__).parents[2])}  # the checkout's root
    killed = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(job), str(KILL_AT)], env=env)
    assert killed.returncode == -signal.SIGKILL
    resumed = read_stats(train.run_train(tmp_path / "resumed", splits, model, spec, tracking=target))
    assert resumed["resumed_from_step"] == SAVE_STEPS

    whole_target = TrackingTarget(f"sqlite:///{tmp_path}/whole.db", "resume-test", "whole")
    whole = read_stats(train.run_train(tmp_path / "whole", splits, model, spec, tracking=whole_target))
    assert whole["resumed_from_step"] is None

    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert resumed["tokens"] == whole["tokens"] > 0
    assert resumed["steps"] == whole["steps"] == MAX_STEPS
    logging_steps = [2, 3, 4, 6, 8, 9, 10, 12]  # every 2nd step and every checkpoint step
    assert [row["step"] for row in whole["log_history"]] == logging_steps
    assert [row["step"] for row in resumed["log_history"]] == logging_steps
    for mine, theirs in zip(resumed["log_history"], whole["log_history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]

    client = mlflow.MlflowClient(target.tracking_uri)
    whole_client = mlflow.MlflowClient(whole_target.tracking_uri)
    for key in ("loss", "num_tokens", "learning_rate"):
        history = client.get_metric_history(resumed["mlflow_run_id"], key)
        expected = whole_client.get_metric_history(whole["mlflow_run_id"], key)
        assert sorted(m.step for m in history) == logging_steps, key  # each logging step once
        by_step = {m.step: m.value for m in expected}
        assert all(m.value == pytest.approx(by_step[m.step], rel=1e-5) for m in history), key
    [train_loss] = client.get_metric_history(resumed["mlflow_run_id"], "train_loss")
    assert train_loss.value == pytest.approx(whole["train_loss"], rel=1e-5)
    assert client.get_run(resumed["mlflow_run_id"]).data.metrics["train_tokens"] == whole["tokens"]


def test_whole_run_loss_weights_each_logged_loss_by_the_steps_it_covers():
    history = [{"step": 2, "loss": 4.0}, {"step": 3, "loss": 1.0}, {"step": 4, "loss": 9.0}]
    assert train.whole_run_loss(history, 0, 2.5, 6) == 2.5  # not resumed: the trainer's own mean
    assert train.whole_run_loss(history, 3, 2.0, 6) == pytest.approx((4.0 * 2 + 1.0 + 2.0 * 3) / 6)
    assert train.whole_run_loss(history, 6, 0.0, 6) == pytest.approx((4.0 * 2 + 1.0 + 9.0) / 4)
