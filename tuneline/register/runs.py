"""Fine-tuning tasks as people look them up: `tuneline runs list` and `tuneline runs show`.

A task is an MLflow run of the register stage (tags `tuneline.recipe_digest` and
`tuneline.stage_digest`, params the flat recipe) with its registered version (aliases, and the
tags `tuneline.promoted`, `tuneline.reason`, `tuneline.guardrails`, `tuneline.exported`), or a
train stage's run that never got registered. The store adds what MLflow does not hold whole: the
register stage's folder (found by its digest) names the split, train and evaluate stages it read,
which hold the funnel, the loss curve, the training log and the evaluation. Nothing here writes.
"""

from __future__ import annotations

import json
import tempfile
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
from tuneline.experiment import is_number

# isort: split
import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tuneline.errors import UserError
from tuneline.register.registry import DIGEST_TAG
from tuneline.report import lineage_funnel
from tuneline.store import StageRef, find_stage, read_manifest, read_stats

# The retention flow's default (ModelStudio clears models that were not exported after 15 days).
RETENTION_DAYS = 15
# Where a recipe may set another retention (the flat param names MLflow holds).
RETENTION_PARAMS = ("retention_days", "register.retention_days")
EXPORTED_TAG = "tuneline.exported"
STAGE_TAG = "tuneline.stage"  # set by the train stage on the run it opens
LOG_LINES = 20
HYPERPARAMETER_PREFIXES = ("model.", "train.", "pretrain.")
NOT_HYPERPARAMETERS = {"model.chat_template"}
RUN_FOLDERS = "runs"
TRAINING_FIGURES = ("steps", "epochs", "train_loss", "seconds", "device", "trainable_params")


class RunNotFound(UserError):
    """RUN names no run, version or run folder that exists."""


def default_tracking_uri(artifacts_dir: str | Path) -> str:
    """The SQLite store a recipe with this artifacts_dir uses when it names no tracking URI."""
    return f"sqlite:///{str(artifacts_dir).rstrip('/')}/mlflow.db"


def open_client(tracking_uri: str) -> mlflow.MlflowClient | None:
    """A client of the store, or None when the SQLite file does not exist (nothing was run; a
    client would create it). Checked here, not with champion.store_exists, which imports torch."""
    database = tracking_uri.removeprefix("sqlite:///")
    if tracking_uri.startswith("sqlite:///") and not Path(database).is_file():
        return None
    return mlflow.MlflowClient(tracking_uri)


def list_runs(
    artifacts_dir: str | Path, tracking_uri: str, now: datetime | None = None
) -> list[dict[str, Any]]:
    """One row per task, newest first: name, description, status, method, base model, data
    size, primary metric, created, expires, and the run id and version that identify it."""
    client = open_client(tracking_uri)
    if client is None:
        return []
    return [summarize(client, run, artifacts_dir) for run in task_runs(client, artifacts_dir)]


def task_runs(client: mlflow.MlflowClient, artifacts_dir: str | Path) -> list[Run]:
    """Runs of the register stage, and train runs no registration took over, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1000)
    registered = [run for run in runs if DIGEST_TAG in run.data.tags]
    superseded = {train_run_id(artifacts_dir, run) for run in registered}
    unregistered = [
        run
        for run in runs
        if DIGEST_TAG not in run.data.tags
        and run.data.tags.get(STAGE_TAG) == "train"
        and run.info.run_id not in superseded
    ]
    return sorted([*registered, *unregistered], key=lambda run: -run.info.start_time)


def summarize(client: mlflow.MlflowClient, run: Run, artifacts_dir: str | Path) -> dict[str, Any]:
    """The list row of one run."""
    params, metrics = run.data.params, run.data.metrics
    version = registered_version(client, run)
    metric = primary_metric_name(params)
    created = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
    stages = stage_refs(artifacts_dir, run)
    return {
        "name": params.get("name") or run.info.run_name,
        "description": params.get("description", ""),
        "status": status(run, version),
        "method": method(params) or trained_method(stages),
        "base_model": params.get("model.name"),
        "data_size": data_size(metrics, stages),
        "metric": metric,
        "metric_value": metrics.get(metric) if metric else None,
        "created": created.isoformat(timespec="seconds"),
        "expires": expiry(created, params, version),
        "run_id": run.info.run_id,
        "model_uri": f"models:/{version.name}/{version.version}" if version else None,
        "aliases": sorted(version.aliases) if version else [],
    }


def status(run: Run, version: ModelVersion | None) -> str:
    """registered / trained (not registered) for a finished run, else MLflow's status."""
    state = run.info.status.lower()
    if state != "finished":
        return state
    return "registered" if version else "trained, not registered"


def method(params: dict[str, str]) -> str | None:
    """The training method, with its quantization when there is one (`lora (nf4)` is QLoRA)."""
    name, quantization = params.get("train.method"), params.get("train.quantization")
    return f"{name} ({quantization})" if name and quantization not in (None, "", "None") else name


def trained_method(stages: dict[str, StageRef]) -> str | None:
    """The method the train stage ran (a train stage's own run holds no recipe params)."""
    if "train" not in stages:
        return None
    found = read_stats(stages["train"]).get("method")
    return found.get("name") if isinstance(found, dict) else found


def primary_metric_name(params: dict[str, str]) -> str | None:
    """`tuned_<register.promote_metric>`: the metric the promotion compares."""
    promote = params.get("register.promote_metric")
    return f"tuned_{promote}" if promote else None


def data_size(metrics: dict[str, float], stages: dict[str, StageRef]) -> int | None:
    """Training examples: the register run's `train_examples`, else the train stage's stats."""
    if is_number(metrics.get("train_examples")):
        return int(metrics["train_examples"])
    if "train" in stages:
        examples = read_stats(stages["train"]).get("examples")
        return int(examples) if is_number(examples) else None
    return None


def expiry(created: datetime, params: dict[str, str], version: ModelVersion | None) -> str:
    """The date retention may remove the model, or `kept` for a version behind an alias or
    tagged exported (retention never removes those)."""
    if version is not None and (version.aliases or version.tags.get(EXPORTED_TAG)):
        return "kept"
    days = next((params[key] for key in RETENTION_PARAMS if key in params), RETENTION_DAYS)
    return (created + timedelta(days=float(days))).date().isoformat()


def registered_version(client: mlflow.MlflowClient, run: Run) -> ModelVersion | None:
    """The version the run's register stage created (found by its stage digest tag), or None."""
    digest, model_name = run.data.tags.get(DIGEST_TAG), run.data.params.get("register.model_name")
    if not digest or not model_name:
        return None
    query = f"name = '{model_name}' and tags.`{DIGEST_TAG}` = '{digest}'"
    try:
        found = client.search_model_versions(query)
    except MlflowException:
        return None
    if not found:
        return None
    return client.get_model_version(model_name, found[0].version)  # search leaves aliases out


def stage_refs(artifacts_dir: str | Path, run: Run) -> dict[str, StageRef]:
    """The stages a run used, by stage name: the register stage and its inputs (split, train,
    evaluate, benchmarks, judge, compare), or the train stage that opened an unregistered run."""
    digest = run.data.tags.get(DIGEST_TAG)
    register = find_stage(artifacts_dir, "register", digest) if digest else None
    if register is None:
        trained = train_stage_of(artifacts_dir, run.info.run_id)
        return {"train": trained} if trained else {}
    refs = {"register": register}
    for entry in read_manifest(register).get("inputs") or []:
        if found := find_stage(artifacts_dir, entry["stage"], entry["digest"]):
            refs[entry["stage"]] = found
    return refs


def train_run_id(artifacts_dir: str | Path, run: Run) -> str | None:
    """The MLflow run the train stage behind a registration opened (the register stage logs into
    it, or into a new run when it could not)."""
    trained = stage_refs(artifacts_dir, run).get("train")
    return read_stats(trained).get("mlflow_run_id") if trained else None


def train_stage_of(artifacts_dir: str | Path, run_id: str) -> StageRef | None:
    """The finished train stage whose stats name this MLflow run."""
    for stats_path in sorted((Path(artifacts_dir) / "stages" / "train").glob("*/stats.json")):
        ref = find_stage(artifacts_dir, "train", stats_path.parent.name)
        if ref is not None and read_stats(ref).get("mlflow_run_id") == run_id:
            return ref
    return None


def find_run(client: mlflow.MlflowClient | None, artifacts_dir: str | Path, ref: str) -> Run:
    """The run RUN names: an MLflow run id, a version (`models:/NAME/3`, `models:/NAME@champion`,
    `NAME@champion`, `NAME/3`) or a run folder under `<artifacts_dir>/runs/`."""
    run_id = run_folder_run_id(artifacts_dir, ref)
    if client is not None:
        run_id = run_id or version_run_id(client, ref) or ref
        try:
            return client.get_run(run_id)
        except MlflowException:
            pass
    raise RunNotFound(not_found_message(client, artifacts_dir, ref))


def run_folder_run_id(artifacts_dir: str | Path, ref: str) -> str | None:
    """The register run id in a run folder's report.json, or None."""
    report = Path(artifacts_dir) / RUN_FOLDERS / Path(ref).name / "report.json"
    if Path(ref).name != ref.rstrip("/").split("/")[-1] or not report.is_file():
        return None
    return (json.loads(report.read_text(encoding="utf-8")).get("registry") or {}).get("run_id")


def version_run_id(client: mlflow.MlflowClient, ref: str) -> str | None:
    """The register run of a version named `models:/NAME/3`, `NAME@alias` and the like."""
    name_part = ref.removeprefix("models:/")
    try:
        if "@" in name_part:
            name, alias = name_part.rsplit("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in name_part:
            name, number = name_part.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            return None
    except MlflowException:
        return None
    digest = version.tags.get(DIGEST_TAG)
    if digest:
        for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'",
        ):
            return run.info.run_id
    return version.run_id


def not_found_message(client: mlflow.MlflowClient | None, artifacts_dir: str | Path, ref: str) -> str:
    """What RUN may be, with a few that exist."""
    examples = []
    if client is not None:
        for row in list_runs(artifacts_dir, client.tracking_uri)[:3]:
            examples += [row["run_id"], *([row["model_uri"]] if row["model_uri"] else [])]
    folders = sorted((Path(artifacts_dir) / RUN_FOLDERS).glob("*/report.json"), reverse=True)
    examples += [path.parent.name for path in folders[:3]]
    known = ", ".join(examples) if examples else f"none yet in {artifacts_dir} (run a recipe first)"
    return (
        f"RUN {ref!r}: no such MLflow run, registered version or run folder; give a run id, "
        f"models:/NAME/VERSION, NAME@alias or a folder of {Path(artifacts_dir) / RUN_FOLDERS}. "
        f"Some that exist: {known}"
    )


def show_run(
    artifacts_dir: str | Path, tracking_uri: str, ref: str, log_lines: int = LOG_LINES
) -> dict[str, Any]:
    """Everything about one task: the list row, hyper-parameters, training data and its funnel,
    training (loss curve file, end of the log), evaluation with guardrails and the champion
    comparison, export state, and the commands to serve or export it."""
    client = open_client(tracking_uri)
    run = find_run(client, artifacts_dir, ref)
    stages = stage_refs(artifacts_dir, run)
    version = registered_version(client, run)
    params = run.data.params
    return {
        **summarize(client, run, artifacts_dir),
        "hyperparameters": hyperparameters(params),
        "data": training_data(client, artifacts_dir, run, stages),
        "training": training(client, run, stages, log_lines),
        "evaluation": evaluation(run, stages),
        "registry": registry_section(version, stages),
        "export": export_state(version),
        "commands": commands(version, artifacts_dir),
    }


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
