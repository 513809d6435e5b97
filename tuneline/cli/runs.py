"""`tuneline runs`: the fine-tuning tasks of a project, as tables for terminals or JSON for scripts.

The Prefect UI and the MLflow UI stay the graphical views; these read the same MLflow store and
the artifacts folder (tuneline/register/runs.py) and change nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuneline.cli.options import DEFAULT_ARTIFACTS_DIR, ArtifactsDir, fail

runs_app = typer.Typer(no_args_is_help=True, help="List fine-tuning runs and show one in detail.")

TrackingUri = Annotated[
    str | None,
    typer.Option(help="The recipe's register.tracking_uri; default: the SQLite store in --artifacts-dir."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
LIST_COLUMNS = {
    "name": "name",
    "description": "description",
    "status": "status",
    "method": "method",
    "base_model": "base model",
    "data_size": "examples",
    "metric_value": "metric",
    "created": "created (UTC)",
    "expires": "expires",
    "model_uri": "version",
    "run_id": "run id",
}


def cell(value: Any) -> str:
    """A value for a table cell: numbers to 4 digits, nothing as a dash."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@runs_app.command("list")
def runs_list(
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    tracking_uri: TrackingUri = None,
    as_json: AsJson = False,
) -> None:
    """Every run, newest first: name, description, status, method, base model, training examples,
    primary metric, created, and when retention may remove it (`kept`: behind an alias or exported)."""
    from tuneline.register.runs import default_tracking_uri, list_runs

    rows = list_runs(artifacts_dir, tracking_uri or default_tracking_uri(artifacts_dir))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no runs yet in {tracking_uri or default_tracking_uri(artifacts_dir)}")
        return
    metrics = sorted({row["metric"] for row in rows if row["metric"]})
    titles = {**LIST_COLUMNS, "metric_value": metrics[0] if len(metrics) == 1 else "metric"}
    table = Table(title="Fine-tuning runs")
    for title in titles.values():
        table.add_column(title, overflow="fold")
    for row in rows:
        created = row["created"][:16].replace("T", " ")  # minutes are enough in a table; UTC
        values = {**row, "model_uri": version_cell(row), "run_id": row["run_id"][:12], "created": created}
        table.add_row(*(cell(values[key]) for key in LIST_COLUMNS))
    Console().print(table)
    if len(metrics) > 1:
        typer.echo("metric: each run's register.promote_metric (" + ", ".join(metrics) + ")")


def version_cell(row: dict[str, Any]) -> str | None:
    """`models:/NAME/3 @champion`."""
    if not row["model_uri"]:
        return None
    return " ".join([row["model_uri"], *(f"@{alias}" for alias in row["aliases"])])


@runs_app.command("show")
def runs_show(
    run: Annotated[
        str,
        typer.Argument(help="An MLflow run id, models:/NAME/VERSION, NAME@alias, or a run folder's name."),
    ],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    tracking_uri: TrackingUri = None,
    log_lines: Annotated[int, typer.Option(help="How many lines of the training log to show.")] = 20,
    as_json: AsJson = False,
) -> None:
    """One run: hyper-parameters, training data and its funnel, loss curve file, end of the training
    log, evaluation with guardrails and champion comparison, export state, serve/export commands."""
    from tuneline.register.runs import RunNotFound, default_tracking_uri, show_run

    try:
        found = show_run(artifacts_dir, tracking_uri or default_tracking_uri(artifacts_dir), run, log_lines)
    except RunNotFound as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        print_run(found, Console())


def print_run(found: dict[str, Any], console: Console) -> None:
    """The run's sections, one after the other."""
    console.print(f"[bold]{found['name']}[/bold]  {found['description'] or ''}".rstrip())
    console.print(
        f"run {found['run_id']}  status {found['status']}  version {cell(version_cell(found))}  "
        f"created {found['created']}  expires {found['expires']}",
        highlight=False,
    )
    print_pairs(console, "Hyper-parameters", found["hyperparameters"])
    print_data(console, found["data"])
    print_training(console, found["training"])
    print_evaluation(console, found["evaluation"], found["registry"])
    export = found["export"]
    console.print(
        f"Export: {'exported (' + export['detail'] + ')' if export['exported'] else 'not exported'}"
    )
    for name, line in found["commands"].items():
        console.print(f"{name}: [bold]{line}[/bold]", highlight=False)


def print_pairs(console: Console, title: str, values: dict[str, Any]) -> None:
    """A two-column table of keys and values."""
    table = Table(title=title)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in values.items():
        table.add_row(key, cell(value))
    console.print(table)


def print_data(console: Console, data: dict[str, Any]) -> None:
    """Split sizes and the funnel."""
    if splits := data.get("splits"):
        console.print("Training data: " + ", ".join(f"{name} {n}" for name, n in splits.items()))
    if funnel := data.get("funnel"):
        table = Table(title="Funnel: records per stage")
        for column in ("stage", "in", "out", "dropped"):
            table.add_column(column)
        for row in funnel:
            dropped = ", ".join(f"{reason}: {n}" for reason, n in row["dropped"].items()) or "-"
            table.add_row(row["stage"], str(row["in"]), str(row["out"]), dropped)
        console.print(table)


def print_training(console: Console, trained: dict[str, Any]) -> None:
    """Training figures, the loss curve's file and the end of the log."""
    if not trained:
        console.print("Training: no train stage in this artifacts folder")
        return
    figures = ("steps", "epochs", "train_loss", "seconds", "device")
    console.print("Training: " + ", ".join(f"{key} {cell(trained[key])}" for key in figures), highlight=False)
    console.print(f"Loss curve: {cell(trained['loss_curve'])}", highlight=False)
    console.print(
        f"Training log: {cell(trained['log'])} (last {len(trained['log_tail'])} lines)", highlight=False
    )
    for line in trained["log_tail"]:
        console.print("  " + line, highlight=False, markup=False)


def print_evaluation(console: Console, evaluation: dict[str, Any], registry: dict[str, Any]) -> None:
    """Scores per model, then the promotion decision with its guardrails."""
    models = [side for side in ("base", "tuned", "champion") if evaluation.get(side)]
    if models:
        names = sorted({key for side in models for key in evaluation[side]})
        table = Table(title=f"Evaluation ({evaluation.get('examples')} test examples)")
        for column in ("model", *names):
            table.add_column(column)
        for side in models:
            label = f"champion v{evaluation['champion_version']}" if side == "champion" else side
            table.add_row(label, *(cell(evaluation[side].get(name)) for name in names))
        console.print(table)
    elif metrics := evaluation.get("metrics"):
        print_pairs(console, "Evaluation (MLflow metrics)", metrics)
    for key in ("benchmarks", "judge", "people"):
        if evaluation.get(key):
            console.print(f"{key}: {json.dumps(evaluation[key])}", highlight=False, markup=False)
    if not registry:
        console.print("Registry: not registered")
        return
    verdict = "promoted to champion" if registry["promoted"] else "not promoted"
    console.print(f"Registry: {verdict}: {registry['reason']}", highlight=False, markup=False)
    if before := registry.get("champion_version_before") or registry.get("champion_before"):
        where = "rescored on this run's test split" if registry.get("champion_rescored") else "its own figure"
        tuned, champion = registry.get("candidate_metric"), registry.get("champion_metric_before")
        console.print(
            f"Champion comparison: {registry.get('metric') or 'metric'} {cell(tuned)} "
            f"vs champion v{before} {cell(champion)} ({where})",
            highlight=False,
        )
    guardrails = registry.get("guardrails") or []
    if isinstance(guardrails, str):
        console.print(f"guardrails: {guardrails}", highlight=False, markup=False)
    for check in guardrails if isinstance(guardrails, list) else []:
        verdict = "passed" if check["passed"] else "FAILED"
        console.print(
            f"guardrail {check['name']}: {verdict} ({check['detail']})", highlight=False, markup=False
        )
