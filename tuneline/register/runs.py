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
from datetime import UTC, datetime
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
from tuneline.recipe import RETENTION_DAYS
from tuneline.register.registry import DIGEST_TAG
from tuneline.register.retention import (
    REMOVED_TAG,
    expiry,
    holders,
    model_created,
    open_client,
    read_exports,
)
from tuneline.register.run_details import (
    EXPORTED_TAG,
    commands,
    evaluation,
    export_state,
    hyperparameters,
    registry_section,
    training,
    training_data,
)
from tuneline.store import StageRef, find_stage, read_manifest, read_stats

# Where a recipe may set another retention (the flat param names MLflow holds).
RETENTION_PARAMS = ("retention_days", "register.retention_days")
STAGE_TAG = "tuneline.stage"  # set by the train stage on the run it opens
LOG_LINES = 20
RUN_FOLDERS = "runs"


class RunNotFound(UserError):
    """RUN names no run, version or run folder that exists."""


def default_tracking_uri(artifacts_dir: str | Path) -> str:
    """The SQLite store a recipe with this artifacts_dir uses when it names no tracking URI."""
    return f"sqlite:///{str(artifacts_dir).rstrip('/')}/mlflow.db"


def list_runs(artifacts_dir: str | Path, tracking_uri: str) -> list[dict[str, Any]]:
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
        "expires": expires(artifacts_dir, run, created, version, stages),
        "run_id": run.info.run_id,
        "model_uri": f"models:/{version.name}/{version.version}" if version else None,
        "aliases": sorted(version.aliases) if version else [],
    }


def status(run: Run, version: ModelVersion | None) -> str:
    """registered / trained (not registered) for a finished run, else MLflow's status."""
    state = run.info.status.lower()
    if state != "finished":
        return state
    if REMOVED_TAG in run.data.tags:
        return "removed by retention"
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


def expires(
    artifacts_dir: str | Path,
    run: Run,
    created: datetime,
    version: ModelVersion | None,
    stages: dict[str, StageRef],
) -> str:
    """When retention may remove the model, by the retention flow's own rule (retention.expiry):
    the train stage's finish time (the run's start without it) plus the run's retention_days;
    `kept` behind an alias or exported; `removed on DATE` once retention removed it."""
    if REMOVED_TAG in run.data.tags:
        return "removed on " + run.data.tags[REMOVED_TAG][:10]
    params = run.data.params
    days = next((params[key] for key in RETENTION_PARAMS if key in params), RETENTION_DAYS)
    trained = stages.get("train")
    exports = read_exports(artifacts_dir).get(trained.digest, []) if trained else []
    aliases, tags = (version.aliases, [version.tags.get(EXPORTED_TAG)]) if version else ([], [])
    return expiry(
        model_created(read_manifest(trained)) if trained else created,
        float(days),
        holders(aliases, tags, exports),
    )


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
    """The register run id in the report.json of run folder `ref` (its name or its path), or None
    when no such folder exists; a folder whose run registered nothing is an error saying so."""
    folder = Path(artifacts_dir) / RUN_FOLDERS / Path(ref.rstrip("/")).name
    if not ref.strip("/") or not folder.is_dir():
        return None
    report = folder / "report.json"
    run_id = None
    if report.is_file():
        run_id = (json.loads(report.read_text(encoding="utf-8")).get("registry") or {}).get("run_id")
    if not run_id:
        raise RunNotFound(
            f"RUN {ref!r}: the run folder {folder} holds no registered run (no report.json with a "
            "registry: the run failed or stopped before register); `tuneline runs list` shows the "
            "runs that trained or registered"
        )
    return run_id


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
