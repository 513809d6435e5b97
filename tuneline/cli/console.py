"""What a person sees at the end of a run: the funnel, base vs tuned, the registry, the UIs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tuneline.pipeline import REGISTER
from tuneline.recipe import Recipe
from tuneline.report import (
    evaluation_title,
    format_dropped,
    number,
    registry_line,
    result_tables,
    reuse_line,
    score_columns,
    scored_models,
    suite_kind_rows,
)


def print_report(
    report: dict[str, Any], recipe: Recipe, prefect_url: str, console: Console | None = None
) -> None:
    """Print the run report the flow returned; `prefect_url` is the server the run used."""
    console = console or Console()
    funnel = Table(title="Funnel: records per stage")
    for column in ("stage", "in", "out", "dropped (reason: count)"):
        funnel.add_column(column, justify="right" if column in ("in", "out") else "left")
    for row in report["funnel"]:
        dropped = format_dropped(row["dropped"])
        funnel.add_row(row["stage"], str(row["in"]), str(row["out"]), dropped)
    console.print(funnel)
    console.print(reuse_line(report))
    if splits := report.get("splits"):
        console.print("splits: " + ", ".join(f"{name} {n}" for name, n in splits.items()))

    if evaluation := report.get("evaluation"):
        columns = score_columns(evaluation)
        columns.insert(1, "perplexity")
        scores = Table(title=evaluation_title(evaluation))
        for column in ("model", *columns):
            scores.add_column(column)
        for name in scored_models(evaluation):
            scores.add_row(name, *(number(evaluation[name].get(key)) for key in columns))
        console.print(scores)
        if suites := evaluation.get("suites"):
            print_suites(suites, console)

    for title, rows in result_tables(report):
        table = Table(title=title)
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*row.values())
        console.print(table)

    if registry := report.get("registry"):
        reused = REGISTER.name in report.get("reused", [])
        console.print(
            f"MLflow run [bold]{registry['run_id']}[/bold]; registered [bold]{registry['model_uri']}[/bold]"
            f"; {registry_line(registry, reused)}"
        )
        for check in registry.get("guardrails") or []:
            verdict = "passed" if check["passed"] else "[bold red]FAILED[/bold red]"
            console.print(f"guardrail {check['name']}: {verdict} ({check['detail']})")
    console.print(f"Run folder: {report.get('run_dir')}")
    tracking = recipe.register.tracking_uri
    console.print(f"Prefect UI: {prefect_url}/runs   MLflow UI ({tracking}): [bold]tuneline ui[/bold]")


def print_suites(suites: dict[str, Any], console: Console) -> None:
    """Test-suite pass rates per assertion kind and model, and where the failures are."""
    table = Table(title="Test suites (passed/run)")
    for column in ("assertion", *scored_models(suites)):
        table.add_column(column)
    for kind, cells in suite_kind_rows(suites):
        table.add_row(kind, *cells)
    console.print(table)
    console.print(
        f"Suites: {', '.join(suites['files'])}; failed assertions: suite_failures.jsonl (evaluate stage)."
    )


def print_failure(error: BaseException, console: Console | None = None) -> None:
    """A failed run: the reason in a sentence, never a traceback for a user's mistake."""
    console = console or Console(stderr=True)
    console.print(f"[bold red]Run failed:[/bold red] {type(error).__name__}: {error}", highlight=False)
