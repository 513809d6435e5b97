"""`tuneline compare ...`: blind comparisons waiting for people, answered in a terminal or a file,
and the ratings of every model compared so far.

    tuneline compare list                          what waits (batch, run, count)
    tuneline compare decide [RUN]                  answer a run's batch key by key (A, B, tie)
    tuneline compare export RUN --to compare.csv|compare.jsonl
    tuneline compare import compare.csv
    tuneline compare ratings MODEL_NAME            the leaderboard of a registered model's ledger

Every answer is stored the moment it is given (tuneline.evaluate.compare's journal), so `q`,
Ctrl-C or a closed terminal keeps them; the next `decide` asks only the rest. When a batch is
complete its paused run is resumed through the Prefect API with the form data the UI would send.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from tuneline.cli.options import DEFAULT_ARTIFACTS_DIR, ArtifactsDir, fail
from tuneline.evaluate.compare import (
    Answer,
    CompareError,
    PendingComparison,
    compare_command_line,
    find_pending,
    finish_batch,
    list_pending,
    now,
    prompt_text,
    read_answers,
    read_items,
    read_ledger,
    record_answer,
    to_form_input,
    undecided,
)
from tuneline.evaluate.compare_file import export_batch, import_answers

KEYS = "[a] A is better  [b] B is better  [t] tie  [s] skip  [q] quit (answers so far are kept)"

compare_app = typer.Typer(
    help="Compare replies blind (A, B or tie) in the terminal or through a file; show ratings.",
    no_args_is_help=True,
)

Rater = Annotated[str, typer.Option(help="Name recorded with your answers.", envvar="TUNELINE_RATER")]
Resume = Annotated[bool, typer.Option(help="Resume the paused run once the batch is answered.")]
DEFAULT_RATER = os.environ.get("USER", "rater")


def describe(pending: PendingComparison) -> str:
    """One line per waiting batch."""
    return (
        f"- run {pending.run_name} ({pending.run_id[:8]}): {pending.count} comparisons for "
        f"{pending.model_name}, batch {pending.batch}"
    )


@compare_app.command("list")
def list_command(artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR) -> None:
    """List the batches waiting for answers, oldest first."""
    waiting = list_pending(artifacts_dir)
    if not waiting:
        typer.echo(f"no comparison waits in {artifacts_dir}")
        return
    for pending in waiting:
        typer.echo(describe(pending))


@compare_app.command("decide")
def decide_command(
    run: Annotated[
        str | None, typer.Argument(metavar="RUN", help="Flow run name or id; default: the oldest batch.")
    ] = None,
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    rater: Rater = DEFAULT_RATER,
    resume: Resume = True,
) -> None:
    """Answer a waiting batch in the terminal; the run resumes once every pair has an answer."""
    waiting = list_pending(artifacts_dir, run)
    if not waiting:
        typer.echo(f"no comparison waits{f' for {run}' if run else ''} in {artifacts_dir}")
        return
    pending = waiting[0]
    items = read_items(artifacts_dir, pending.batch)
    todo = undecided(items, read_answers(artifacts_dir, pending.batch))
    typer.echo(f"{describe(pending)}\n{len(todo)} of {len(items)} to go")
    for number, item in enumerate(todo, start=1):
        pick = ask(item, number, len(todo))
        if pick is None:
            typer.echo(
                f"stopped; answers kept. `{compare_command_line('decide', pending.run_name)}` goes on."
            )
            return
        if pick != "skip":
            record_answer(
                artifacts_dir, pending.batch, Answer(id=item["id"], winner=pick, rater=rater, at=now())
            )
    if left := undecided(items, read_answers(artifacts_dir, pending.batch)):
        typer.echo(
            f"{len(left)} skipped comparisons still wait: "
            f"`{compare_command_line('decide', pending.run_name)}`"
        )
        return
    finish(artifacts_dir, pending, rater, resume)


def ask(item: dict[str, Any], number: int, total: int) -> str | None:
    """Show one blind pair and read a pick: "A", "B", "tie", "skip", or None to quit."""
    typer.echo(f"\n--- {number}/{total}\n[prompt] {prompt_text(item['prompt'])}")
    typer.echo(f"\n[A] {item['a']}\n\n[B] {item['b']}\n")
    while True:
        typer.echo(KEYS)
        key = click.getchar().lower()
        if key in ("q", "\x03", "\x04", ""):  # "": the input ended
            return None
        picks = {"a": "A", "b": "B", "t": "tie", "s": "skip"}
        if key in picks:
            typer.echo(picks[key])
            return picks[key]


@compare_app.command("export")
def export_command(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Flow run name or id (or batch digest).")],
    to: Annotated[Path, typer.Option(help="The .csv or .jsonl file to write.")],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
) -> None:
    """Write a waiting batch's unanswered pairs to a file to fill in (winner: A, B or tie)."""
    try:
        pending = find_pending(artifacts_dir, run)
        count = export_batch(artifacts_dir, pending, to)
    except CompareError as error:
        raise fail(error) from None
    typer.echo(
        f"{count} comparisons written to {to}; fill in winner (A, B or tie), then "
        f"`{compare_command_line('import', str(to))}`"
    )


@compare_app.command("import")
def import_command(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A file from `tuneline compare export`, filled in.")
    ],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    rater: Rater = DEFAULT_RATER,
    resume: Resume = True,
) -> None:
    """Store the answers of a filled-in file; the run resumes once its batch is complete."""
    try:
        pending, final = import_answers(artifacts_dir, file, rater)
    except CompareError as error:
        raise fail(error) from None
    if final is None:
        left = undecided(read_items(artifacts_dir, pending.batch), read_answers(artifacts_dir, pending.batch))
        typer.echo(f"stored; {len(left)} comparisons of batch {pending.batch} still have no answer")
        return
    typer.echo(f"batch {pending.batch}: all {len(final)} comparisons answered")
    if resume:
        resume_run(artifacts_dir, pending, rater)


@compare_app.command("ratings")
def ratings_command(
    model_name: Annotated[str, typer.Argument(help="The registered model (register.model_name).")],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    judge: Annotated[bool, typer.Option(help="Rate the judge's verdicts instead of people's.")] = False,
) -> None:
    """The leaderboard of every model compared for MODEL_NAME: Elo, Bradley-Terry and its 95% interval."""
    from tuneline.evaluate.ratings import leaderboard

    kind = "judge" if judge else "human"
    battles = [b for b in read_ledger(artifacts_dir, model_name) if b["kind"] == kind]
    if not battles:
        typer.echo(f"no {kind} comparisons recorded for {model_name} in {artifacts_dir}")
        return
    typer.echo(f"{'model':<40} {'elo':>7} {'bt':>7} {'95% interval':>17} {'games':>6}")
    for row in leaderboard(battles):
        interval = f"{row['ci_low']:.0f}..{row['ci_high']:.0f}"
        typer.echo(
            f"{row['model']:<40} {row['elo']:>7.0f} {row['bt']:>7.0f} {interval:>17} {row['games']:>6}"
        )


def finish(artifacts_dir: Path, pending: PendingComparison, rater: str, resume: bool) -> None:
    """Finish a complete batch (answers file, ledger) and resume its run."""
    finish_batch(artifacts_dir, pending.batch, pending.model_name)
    typer.echo(f"batch {pending.batch}: all {pending.count} comparisons answered")
    if resume:
        resume_run(artifacts_dir, pending, rater)


def resume_run(artifacts_dir: Path, pending: PendingComparison, rater: str) -> None:
    """Resume the paused flow run; its form is empty, since every pair has an answer stored."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if pending.run_id == "local" or pending.wait == "later":
        typer.echo("answers stored; re-run the recipe: it uses them without asking again")
        return
    form = to_form_input(
        read_items(artifacts_dir, pending.batch), read_answers(artifacts_dir, pending.batch), rater
    )
    api_url = os.environ.get("PREFECT_API_URL") or pending.api_url
    try:
        with temporary_settings({PREFECT_API_URL: api_url} if api_url else {}):
            resume_flow_run(UUID(pending.run_id), run_input=form)
    except Exception as error:  # noqa: BLE001 - the answers are stored; a re-run goes on from them
        typer.echo(
            f"answers stored, but run {pending.run_name} could not be resumed ({error}); "
            "re-run the recipe: it goes on without asking again"
        )
        return
    typer.echo(f"run {pending.run_name} resumed")
