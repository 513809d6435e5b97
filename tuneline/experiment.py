"""MLflow, set up in one place: the tracking store, the experiment, and how values are named.

Every stage that tracks (augment, train, register) opens its experiment with `open_experiment`,
names metrics with `prefixed_metrics` and cuts params with `truncate_params`, so one run never
carries both `train_loss` and `train_train_loss`. mlflow is imported inside the functions: it
costs seconds, and a cached stage must not pay for it.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from tuneline.errors import UserError
from tuneline.objectstore import bound_store

# Read when mlflow is imported: MLflow 3 starts usage telemetry (a network thread, an id file in
# ~/.config/mlflow) from `import mlflow`, and draws progress bars over every artifact download.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MAX_PARAM_CHARS = 6000  # MLflow rejects longer param values (e.g. a pasted chat template)
TRUNCATED = "...[truncated]"
DATABASE_STORES = ("postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores besides SQLite


@dataclass(frozen=True)
class TrackingTarget:
    """Where the train stage's MLflow run goes: the recipe's `register` section and a run name.

    The train stage opens the run; the register stage adds to it."""

    tracking_uri: str
    experiment: str
    run_name: str


def check_tracking_store(tracking_uri: str, field: str = "register.tracking_uri") -> None:
    """Fail at once, naming `field`, when a database tracking store (PostgreSQL, MySQL, SQL Server)
    cannot be reached: MLflow itself retries a refused connection for ~100 s, then shows a traceback.
    Other stores (SQLite, an MLflow server, a folder) are left to MLflow."""
    if tracking_uri.partition("://")[0].partition("+")[0] not in DATABASE_STORES:
        return
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        url = sqlalchemy.engine.make_url(tracking_uri)
        shown = url.render_as_string(hide_password=True)
        timeout = url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg2", "psycopg")
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if timeout else {})
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise UserError(
            f"{field}: {tracking_uri.split('@')[-1]!r} is not a database URL MLflow can use ({error}); "
            "write postgresql://USER:PASSWORD@HOST:PORT/DATABASE (its driver, psycopg2, comes with Tuneline)"
        ) from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UserError(
            f"{field} {shown}: cannot connect to the MLflow database ({reason}); start the database "
            f"server, or fix the host, port, user or database name in {field} (the database must "
            "exist, e.g. `createdb mlflow`) or the password (PGPASSWORD or ~/.pgpass); an unset "
            "tracking_uri uses the SQLite file in artifacts_dir"
        ) from None
    finally:
        engine.dispose()


def open_experiment(tracking_uri: str, experiment: str, artifacts_dir: str | Path) -> str:
    """Point MLflow at the store and return the experiment's id, creating it (its artifacts under
    the project's `mlartifacts/`, or `<store>/mlartifacts` with an object store as artifacts_dir)
    and a SQLite database's folder when missing.

    For a SQLite store this runs under a file lock beside the database: two processes opening a new
    database at once both run MLflow's table migrations and one fails ("Online migration expected
    to match one row"), and two creating one experiment at once collide."""
    import mlflow

    check_tracking_store(tracking_uri)
    guard: Any = nullcontext()
    if tracking_uri.startswith("sqlite:///"):
        # `sqlite:///rel/path.db` is relative to the working directory, `sqlite:////abs.db` absolute;
        # SQLite does not create the folder.
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        guard = FileLock(database.with_name(f"{database.name}.lock"))
    mlflow.set_tracking_uri(tracking_uri)
    with guard:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            remote = bound_store(artifacts_dir)  # an object store keeps the models, not this machine
            location = (
                f"{remote.url}/mlartifacts"
                if remote
                else str((Path(artifacts_dir) / "mlartifacts").resolve())
            )
            return mlflow.create_experiment(experiment, artifact_location=location)
    if found.lifecycle_stage == "deleted":
        raise UserError(
            f"register.experiment: {experiment!r} is deleted in the tracking store; restore it (`mlflow "
            f"experiments restore --experiment-id {found.experiment_id}`) or choose another name"
        )
    return found.experiment_id


def is_number(value: Any) -> bool:
    """A finite int or float (bools are not numbers here): what MLflow can log as a metric."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def prefixed_metrics(stats: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a stage's stats as metrics named `<prefix>_<key>`; a key that already starts
    with the prefix keeps its name (`train_loss`, never `train_train_loss`)."""
    return {
        key if key.startswith(f"{prefix}_") else f"{prefix}_{key}": float(value)
        for key, value in stats.items()
        if is_number(value)
    }


def truncate_params(params: dict[str, Any]) -> dict[str, str]:
    """Param values as text cut to MLflow's limit and marked as cut (the full recipe is logged as
    `recipe.yaml` beside them)."""
    cut = MAX_PARAM_CHARS - len(TRUNCATED)
    texts = {key: str(value) for key, value in params.items()}
    return {
        key: text if len(text) <= MAX_PARAM_CHARS else text[:cut] + TRUNCATED for key, text in texts.items()
    }


def log_augment_rounds(
    tracking_uri: str, experiment: str, artifacts_dir: str | Path, run_name: str, rows: list[dict[str, Any]]
) -> str:
    """One MLflow run per augmentation; each round's counts and tokens are a step of its metrics.
    Returns the run id."""
    import mlflow

    experiment_id = open_experiment(tracking_uri, experiment, artifacts_dir)
    keys = ("prompt_tokens", "completion_tokens", "generated", "accepted", "edited",
            "rejected_in_review", "acceptance_rate")  # fmt: skip
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"augment-{run_name}") as run:
        for row in rows:
            mlflow.log_metrics({key: float(row[key]) for key in keys}, step=row["round"])
    return run.info.run_id
