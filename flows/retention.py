"""The scheduled `retention` flow: remove the trained models that expired (daily in prefect.yaml).

    plan (what expired, what an alias, an export, youth or a live run keeps) -> remove -> table

The core (tuneline/register/retention.py) decides and removes; the flow adds the Prefect table
artifact of what went and what stayed, and returns the report as a dict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tuneline.errors import quiet_user_errors
from tuneline.objectstore import open_artifacts
from tuneline.recipe import Recipe
from tuneline.register.retention import RetentionReport, apply_retention, plan_retention


@flow(name="retention")
def retention(recipe: Recipe, dry_run: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """Remove trained models older than `register.retention_days` that no alias or export keeps,
    with the stages built from them and their MLflow versions (`dry_run`: only list them); `now`
    sets the clock (default: the current time)."""
    quiet_user_errors()  # a worker's log shows a user's mistake without a traceback
    spec = recipe.register
    plan = plan_retention(
        open_artifacts(recipe.artifacts_dir, recipe.work_dir), spec.tracking_uri, spec.retention_days, now
    )
    report = apply_retention(plan, dry_run=dry_run)
    create_table_artifact(
        table_rows(report),
        key="retention",
        description=summary(report),
    )
    get_run_logger().info(summary(report))
    return report.model_dump(mode="json")


def table_rows(report: RetentionReport) -> list[dict[str, Any]]:
    """One row per model stage: removed (or would be) or kept, why, its size and what went with it."""
    verb = "would remove" if report.dry_run else "removed"
    return [
        {
            "action": verb if entry.action == "remove" else "kept",
            "stage": entry.stage,
            "digest": entry.digest,
            "created": entry.created.isoformat(timespec="minutes"),
            "expires": entry.expires.date().isoformat(),
            "bytes": entry.bytes,
            "why": "; ".join(entry.reasons),
            "with it": ", ".join([*(f"{i.stage} {i.digest}" for i in entry.stages), *entry.versions]),
        }
        for entry in [*report.removed, *report.kept]
    ]


def summary(report: RetentionReport) -> str:
    """A line for the log and the artifact."""
    verb, freed = ("would remove", "would free") if report.dry_run else ("removed", "freed")
    return (
        f"retention ({report.retention_days} days) at {report.now.isoformat(timespec='minutes')}: "
        f"{verb} {len(report.removed)} model(s), kept {len(report.kept)}; {freed} {report.bytes_freed} bytes"
    )
