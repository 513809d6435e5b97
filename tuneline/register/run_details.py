"""The sections of `tuneline runs show` (tuneline/register/runs.py finds the run and its stages):
hyper-parameters, training data, training, evaluation, the promotion decision, export state and
the commands that serve or export the model. Each reads the stage folders first and falls back on
what the MLflow run holds when the store was moved or cleared."""

from __future__ import annotations

import json
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
import tuneline.experiment  # noqa: F401

# isort: split
import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tuneline.report import lineage_funnel
from tuneline.store import StageRef, read_stats

EXPORTED_TAG = "tuneline.exported"
HYPERPARAMETER_PREFIXES = ("model.", "train.", "pretrain.")
NOT_HYPERPARAMETERS = {"model.chat_template"}
TRAINING_FIGURES = ("steps", "epochs", "train_loss", "seconds", "device", "trainable_params")


def hyperparameters(params: dict[str, str]) -> dict[str, str]:
    """The recipe's model, pretrain and train settings as the run logged them."""
    strategy = params.get("train.distributed.strategy", "none")
    return {
        key: value
        for key, value in sorted(params.items())
        if key.startswith(HYPERPARAMETER_PREFIXES)
        and key not in NOT_HYPERPARAMETERS
        and not unused_distributed_setting(key, strategy)
    }


def unused_distributed_setting(key: str, strategy: str) -> bool:
    """A `train.distributed` setting the run's strategy does not read (all of them without one)."""
    if not key.startswith("train.distributed.") or key == "train.distributed.strategy":
        return False
    if strategy == "none":
        return True
    section = key.removeprefix("train.distributed.").split(".")[0]
    return section in ("fsdp", "deepspeed") and section != strategy


def training_data(
    client: mlflow.MlflowClient, artifacts_dir: str | Path, run: Run, stages: dict[str, StageRef]
) -> dict[str, Any]:
    """Split sizes and the funnel (records in, out and dropped by reason per stage)."""
    split = stages.get("split")
    if split is not None:
        return {"splits": read_stats(split).get("counts"), "funnel": lineage_funnel(artifacts_dir, split)}
    logged = artifact_text(client, run.info.run_id, "funnel.json")  # the copy the register stage logged
    return {"splits": None, "funnel": json.loads(logged).get("funnel") if logged else None}


def training(
    client: mlflow.MlflowClient, run: Run, stages: dict[str, StageRef], log_lines: int
) -> dict[str, Any]:
    """Training figures, the loss curve file and the last lines of the training log: from the
    train stage's folder, else from the files the train stage attached to its MLflow run."""
    trained = stages.get("train")
    if trained is None:
        return logged_training(client, run, log_lines)
    stats = read_stats(trained)
    curve, log = trained.file("loss_curve.png"), trained.file("train.log")
    return {
        "stage_dir": str(trained.dir),
        **{key: stats.get(key) for key in TRAINING_FIGURES},
        "loss_curve": str(curve) if curve.is_file() else None,
        "log": str(log) if log.is_file() else None,
        "log_tail": tail(log, log_lines),
    }


def logged_training(client: mlflow.MlflowClient, run: Run, log_lines: int) -> dict[str, Any]:
    """The training section from the MLflow run alone (the store was moved or cleared)."""
    run_id, metrics = run.info.run_id, run.data.metrics
    files = {item.path for item in client.list_artifacts(run_id)}
    text = artifact_text(client, run_id, "train.log") if "train.log" in files else None
    return {
        "stage_dir": None,
        **{key: metrics.get(key if key.startswith("train_") else f"train_{key}") for key in TRAINING_FIGURES},
        "loss_curve": f"runs:/{run_id}/loss_curve.png" if "loss_curve.png" in files else None,
        "log": f"runs:/{run_id}/train.log" if text is not None else None,
        "log_tail": text.splitlines()[-log_lines:] if text and log_lines > 0 else [],
    }


def artifact_text(client: mlflow.MlflowClient, run_id: str, path: str) -> str | None:
    """A text file attached to a run, or None when it has none."""
    with tempfile.TemporaryDirectory(prefix="tuneline-runs-") as scratch:
        try:
            local = client.download_artifacts(run_id, path, scratch)
        except (MlflowException, OSError):
            return None
        return Path(local).read_text(encoding="utf-8", errors="replace")


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file (none when it does not exist)."""
    if not path.is_file() or lines <= 0:
        return []
    with path.open(encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]


def evaluation(run: Run, stages: dict[str, StageRef]) -> dict[str, Any]:
    """The evaluate stage's scores (base, tuned, champion) and the later stages' figures
    (benchmarks, judge, people), from the store; the run's metrics when the store lacks them."""
    if "evaluate" not in stages:
        return {"metrics": dict(sorted(run.data.metrics.items()))}
    stats = read_stats(stages["evaluate"])
    found: dict[str, Any] = {
        key: stats.get(key) for key in ("metric", "examples", "base", "tuned", "champion", "champion_version")
    }
    if suites := stats.get("suites"):
        found["suite_pass_rate"] = {
            side: (suites.get(side) or {}).get("pass_rate") for side in ("base", "tuned", "champion")
        }
    if "benchmarks" in stages:
        found["benchmarks"] = read_stats(stages["benchmarks"]).get("tasks")
    for stage, key in (("judge", "judge"), ("compare", "people")):
        if stage in stages:
            found[key] = read_stats(stages[stage]).get("pairs")
    return found


def registry_section(version: ModelVersion | None, stages: dict[str, StageRef]) -> dict[str, Any]:
    """The promotion decision: promoted, reason, guardrails, and the champion it was compared to."""
    if version is None:
        return {}
    tags = version.tags
    section: dict[str, Any] = {
        "promoted": tags.get("tuneline.promoted") == "true",
        "reason": tags.get("tuneline.reason"),
        "guardrails": tags.get("tuneline.guardrails"),
        "champion_before": tags.get("tuneline.champion_before") or None,
        "champion_metric_before": tags.get("tuneline.champion_metric_before") or None,
    }
    if "register" in stages:
        stats = read_stats(stages["register"])
        keys = (
            "metric",
            "candidate_metric",
            "champion_version_before",
            "champion_metric_before",
            "champion_rescored",
        )
        section |= {key: stats.get(key) for key in keys} | {"guardrails": stats.get("guardrails") or []}
    return section


def export_state(version: ModelVersion | None) -> dict[str, Any]:
    """Whether the version was exported (the `tuneline.exported` tag and what it says)."""
    exported = version.tags.get(EXPORTED_TAG) if version else None
    return {"exported": bool(exported), "detail": exported or None}


def commands(version: ModelVersion | None, artifacts_dir: str | Path) -> dict[str, str]:
    """The command lines that serve or export this model."""
    if version is None:
        return {}
    uri = f"models:/{version.name}/{version.version}"
    target = Path(artifacts_dir) / "exports" / f"{version.name}-v{version.version}"
    return {
        "serve": f"tuneline serve {uri}",
        "export": f"tuneline export {uri} --format merged --to {target}",
    }
