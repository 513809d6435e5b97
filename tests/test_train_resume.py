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
from pathlib import Path

import pytest
from train_fixtures import make_split_and_model, small_spec

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
    env = {**os.environ, "PYTHONPATH": str(Path(train.__file__).parents[1])}
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
