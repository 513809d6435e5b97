"""`tuneline retention RECIPE`: remove the trained models that expired (tuneline/register/retention.py).

The same core the scheduled `retention` flow runs, called directly (no Prefect server needed):
with `--dry-run` it lists what would go and why the rest stays; `--now` sets the clock.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuneline.cli.options import fail
from tuneline.errors import UserError
from tuneline.objectstore import open_artifacts
from tuneline.recipe import RecipeError, load_recipe

COLUMNS = ("action", "stage", "digest", "created (UTC)", "expires", "size", "why", "with it")


def retention_command(
    recipe_path: Annotated[Path, typer.Argument(help="Recipe whose artifacts and MLflow store to clean.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; remove nothing.")] = False,
    now: Annotated[
        str | None,
        typer.Option(help="The clock, as an ISO date or time (UTC unless it names a zone); default: now."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")
    ] = False,
) -> None:
    """Remove trained models older than register.retention_days that no alias or export keeps,
    with the stages built from them and their MLflow versions; data stages are never touched."""
    from tuneline.register.retention import apply_retention, plan_retention

    try:
        recipe = load_recipe(recipe_path, [])
    except RecipeError as error:
        raise fail(str(error)) from None
    clock = parse_now(now)
    try:
        plan = plan_retention(
            open_artifacts(recipe.artifacts_dir, recipe.work_dir),
            recipe.register.tracking_uri,
            recipe.register.retention_days,
            clock,
        )
        report = apply_retention(plan, dry_run=dry_run)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    print_report(report.model_dump(mode="json"), Console())


def parse_now(now: str | None) -> datetime | None:
    """`--now` as a datetime; a bad value exits 2 naming the format."""
    if now is None:
        return None
    try:
        return datetime.fromisoformat(now)
    except ValueError:
        raise fail(
            f"--now {now!r}: not an ISO date or time; give e.g. 2026-12-21 or 2026-12-21T08:00"
        ) from None


def size(n: int) -> str:
    """Bytes for people: 1.2 MB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def print_report(report: dict[str, Any], console: Console) -> None:
    """One row per model stage (removed, or kept and why), then the total."""
    verb = "would remove" if report["dry_run"] else "removed"
    table = Table(title=f"Retention at {report['now'][:16]} UTC ({report['retention_days']} days)")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for action, entries in ((verb, report["removed"]), ("kept", report["kept"])):
        for entry in entries:
            with_it = [f"{item['stage']} {item['digest']}" for item in entry["stages"]] + entry["versions"]
            table.add_row(
                action,
                entry["stage"],
                entry["digest"],
                entry["created"][:16].replace("T", " "),
                entry["expires"][:10],
                size(entry["bytes"]),
                "; ".join(entry["reasons"]),
                ", ".join(with_it) or "-",
            )
    console.print(table)
    freed = "would free" if report["dry_run"] else "freed"
    versions = ", ".join(report["versions_deleted"]) or "none"
    deleted = "MLflow versions to delete" if report["dry_run"] else "MLflow versions deleted"
    console.print(
        f"{verb} {len(report['removed'])} model(s), kept {len(report['kept'])}; {freed} "
        f"{size(report['bytes_freed'])}; {deleted}: {versions}",
        highlight=False,
    )
