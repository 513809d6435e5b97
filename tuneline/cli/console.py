"""What a person sees at the end of a run: the funnel, base vs tuned, the registry, the UIs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tuneline.pipeline import REGISTER
from tuneline.recipe import Recipe
from tuneline.report import format_dropped, number, registry_line, reuse_line


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
        metric = evaluation.get("metric", "exact_match")
        scores = Table(title=f"Base vs tuned on the test split ({evaluation.get('examples')} examples)")
        for column in ("model", "loss", "perplexity", metric):
            scores.add_column(column)
        for name in ("base", "tuned"):
            row = evaluation[name]
            scores.add_row(name, *(number(row[key]) for key in ("loss", "perplexity", metric)))
        console.print(scores)

    if registry := report.get("registry"):
        reused = REGISTER.name in report.get("reused", [])
        console.print(
            f"MLflow run [bold]{registry['run_id']}[/bold]; registered [bold]{registry['model_uri']}[/bold]"
            f"; {registry_line(registry, reused)}"
        )
    console.print(f"Run folder: {report.get('run_dir')}")
    tracking = recipe.register.tracking_uri
    console.print(f"Prefect UI: {prefect_url}/runs   MLflow UI ({tracking}): [bold]tuneline ui[/bold]")


def print_failure(error: BaseException, console: Console | None = None) -> None:
    """A failed run: the reason in a sentence, never a traceback for a user's mistake."""
    console = console or Console(stderr=True)
    console.print(f"[bold red]Run failed:[/bold red] {type(error).__name__}: {error}", highlight=False)
