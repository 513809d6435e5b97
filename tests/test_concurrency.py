"""Two `tuneline run` of one recipe started at once in one project folder: the stages are written
once (the second run waits for the first, says so, and reuses what it wrote), the training log
is one training's, and both runs report the same stages and the same registered version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_flow import project, recipe_for  # noqa: F401  (the tiny project fixture)

pytestmark = pytest.mark.slow


def start_run(recipe_path: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tuneline.cli.main", "run", str(recipe_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def two_runs(project, tmp_path):  # noqa: F811
    """Start two runs of one recipe at the same moment; their processes and outputs."""
    recipe = recipe_for(project, train={"max_steps": 16, "save_steps": 4, "logging_steps": 4})
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["artifacts_dir"] = str(tmp_path / "store")
    data["register"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A project that has run before has its MLflow database (two runs creating it at once can
    # fail in MLflow's own schema migration, a separate matter).
    import mlflow

    mlflow.MlflowClient(data["register"]["tracking_uri"]).search_experiments()
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    # What a run killed with kill -9 while writing a stage leaves: a temporary folder nobody owns.
    stale = tmp_path / "store" / "stages" / "collect" / ".tmp-0123456789abcdef-deadbeef"
    stale.mkdir(parents=True)
    (stale / "records.jsonl").write_text("{}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    runs = [start_run(path, env), start_run(path, env)]
    try:
        outputs = [run.communicate(timeout=900)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-4000:]
    return runs, outputs, tmp_path / "store"


def stage_folders(store: Path, stage: str) -> list[str]:
    return sorted(path.name for path in (store / "stages" / stage).iterdir())


def test_two_runs_at_once_write_each_stage_once_and_report_the_same_model(two_runs):
    runs, outputs, store = two_runs
    # Each stage written once, no temporary folder left (a killed run's removed at the start),
    # one training in the training log.
    assert "removed 1 temporary folder(s) left by killed runs" in "".join(outputs)
    for stage in ("collect", "clean", "gate", "split", "train", "evaluate", "register"):
        folders = stage_folders(store, stage)
        assert len(folders) == 1 and not folders[0].startswith("."), (stage, folders)
    (train_dir,) = (store / "stages" / "train").iterdir()
    log = (train_dir / "train.log").read_text()
    assert log.count("training started") == 1, log
    assert "training resumed" not in log
    stats = json.loads((train_dir / "stats.json").read_text())
    assert [row["step"] for row in stats["log_history"]] == [4, 8, 12, 16]

    # The run that found a stage being written waited for the other, and said for whom.
    waits = [
        output.count(f"waiting for pid {other.pid} ")
        for output, other in zip(outputs, reversed(runs), strict=True)
    ]
    assert sum(waits) >= 1, outputs[0][-3000:] + outputs[1][-3000:]
    assert "which is writing stage" in "".join(outputs)

    # Both runs report the same stages and the one registered version.
    reports = [json.loads(path.read_text()) for path in sorted(store.glob("runs/*/report.json"))]
    assert len(reports) == 2
    assert reports[0]["stage_dirs"] == reports[1]["stage_dirs"]
    assert reports[0]["registry"]["model_uri"] == reports[1]["registry"]["model_uri"]
    for output in outputs:
        assert reports[0]["registry"]["model_uri"] in output

    # One MLflow training run, each loss point logged once.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store.parent / 'mlflow.db'}")
    history = client.get_metric_history(stats["mlflow_run_id"], "loss")
    assert sorted(Counter(point.step for point in history).values()) == [1, 1, 1, 1]
