"""`tuneline review ...`: what waits for review, and deciding it in a terminal or through a file.

    tuneline review list                       what waits for review (batch, run, round, count, how)
    tuneline review decide [RUN]               review the batch of that run (flow run id or name),
                                               or the oldest waiting batch
    tuneline review export RUN --to review.csv|review.jsonl
    tuneline review import review.csv

Each decision is stored the moment it is made (tuneline.augment.review's journal), so `q`, Ctrl-C or
a closed terminal keeps every decision so far; the next `tuneline review decide` goes on with the
rest. When a batch is complete the paused flow run is resumed through the Prefect API with the same
form data the UI would send. Prefect is imported only for that resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from tuneline.augment.checkpoint import FILL_IN
from tuneline.augment.review import (
    Decision,
    PendingBatch,
    ReviewError,
    answer_of,
    export_batch,
    find_pending,
    finish_batch,
    import_decisions,
    list_pending,
    make_decision,
    read_candidates,
    read_decisions,
    record_decision,
    review_command_line,
    to_form_input,
    undecided,
)
from tuneline.cli.options import DEFAULT_ARTIFACTS_DIR, ArtifactsDir, fail

KEYS = "[a]ccept  [r]eject  [e]dit  [s]kip  [q]uit (decisions so far are kept)"

review_app = typer.Typer(
    help="Decide augmentation candidates waiting for review: in the terminal, or through a file.",
    no_args_is_help=True,
)

Reviewer = Annotated[str, typer.Option(help="Name recorded with your decisions.", envvar="TUNELINE_REVIEWER")]
Resume = Annotated[bool, typer.Option(help="Resume the paused run once the batch is decided.")]
DEFAULT_REVIEWER = os.environ.get("USER", "reviewer")


def describe(pending: PendingBatch) -> str:
    """One line per waiting batch: its run, round, size, digest and how the recipe reviews it."""
    return (
        f"- run {pending.run_name} ({pending.run_id[:8]}) round {pending.round}: {pending.count} "
        f"candidates, batch {pending.batch}, review.how {pending.how}"
    )


@review_app.command("list")
def list_command(artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR) -> None:
    """List the batches waiting for review, oldest first (exit 0 also when none waits)."""
    waiting = list_pending(artifacts_dir)
    if not waiting:
        typer.echo(f"nothing waits for review in {artifacts_dir}")
        return
    for pending in waiting:
        typer.echo(describe(pending))
    typer.echo(
        f"decide one with `{review_command_line('decide', 'RUN')}`, or through a file with "
        f"`{review_command_line('export', 'RUN', '--to', 'review.csv')}`"
    )


@review_app.command("decide")
def decide_command(
    run: Annotated[
        str | None,
        typer.Argument(metavar="RUN", help="Flow run name or id; default: the oldest waiting batch."),
    ] = None,
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    reviewer: Reviewer = DEFAULT_REVIEWER,
    resume: Resume = True,
) -> None:
    """Review a waiting batch in the terminal, key by key; the run resumes once it is decided."""
    review_in_terminal(artifacts_dir, run, reviewer, resume)


@review_app.command("export")
def export_command(
    run: Annotated[
        str, typer.Argument(metavar="RUN", help="Flow run name or id (or batch digest) to export.")
    ],
    to: Annotated[Path, typer.Option(help="The .csv or .jsonl file to write.")],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
) -> None:
    """Write a waiting batch to a file to fill in (decisions made so far are filled in)."""
    try:
        pending = find_pending(artifacts_dir, run)
        count = export_batch(artifacts_dir, pending, to)
    except ReviewError as error:
        raise fail(error) from None
    typer.echo(
        f"{count} candidates of round {pending.round} written to {to}; {FILL_IN}, then "
        f"`{review_command_line('import', str(to))}`"
    )


@review_app.command("import")
def import_command(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A file written by `tuneline review export`, filled in.")
    ],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    reviewer: Reviewer = DEFAULT_REVIEWER,
    resume: Resume = True,
) -> None:
    """Store the decisions of a filled-in file; the run resumes once its batch is decided."""
    try:
        pending, final = import_decisions(artifacts_dir, file, reviewer)
    except ReviewError as error:
        raise fail(error) from None
    if final is None:
        left = undecided(read_candidates(pending), read_decisions(artifacts_dir, pending.batch))
        typer.echo(f"stored; {len(left)} candidates of batch {pending.batch} still have no decision")
        return
    typer.echo(f"batch {pending.batch}: all {len(final)} candidates decided")
    if resume:
        resume_run(artifacts_dir, pending, reviewer)


def review_in_terminal(artifacts_dir: Path, run: str | None, reviewer: str, resume: bool) -> None:
    """List the pending batches, then take decisions on the chosen one, key by key."""
    waiting = list_pending(artifacts_dir, run)
    if not waiting:
        typer.echo(f"nothing waits for review{f' for {run}' if run else ''} in {artifacts_dir}")
        return
    for pending in waiting:
        typer.echo(describe(pending))
    pending = waiting[0]
    candidates = read_candidates(pending)
    made = read_decisions(artifacts_dir, pending.batch)
    todo = undecided(candidates, made)
    typer.echo(
        f"\nReviewing round {pending.round} of {pending.run_name}: {len(todo)} of {len(candidates)} to go"
    )
    for number, candidate in enumerate(todo, start=1):
        decision = ask(candidate, number, len(todo), reviewer)
        if decision is None:
            typer.echo(
                f"stopped; {len(made)} decisions kept. "
                f"`{review_command_line('decide', pending.run_name)}` goes on."
            )
            return
        if decision == "skip":
            continue
        record_decision(artifacts_dir, pending.batch, decision)
        made[decision.id] = decision
    if undecided(candidates, made):
        typer.echo(
            f"{len(undecided(candidates, made))} skipped candidates still wait for a decision: "
            f"`{review_command_line('decide', pending.run_name)}`"
        )
        return
    finish_batch(artifacts_dir, pending.batch, candidates, [])
    typer.echo(f"batch {pending.batch}: all {len(candidates)} candidates decided")
    if resume:
        resume_run(artifacts_dir, pending, reviewer)


def ask(candidate: dict[str, Any], number: int, total: int, reviewer: str) -> Decision | str | None:
    """Show one candidate and read a decision; None means quit, "skip" leaves it for later."""
    typer.echo(f"\n--- {number}/{total}  {candidate['id']}")
    for message in candidate["messages"]:
        typer.echo(f"[{message['role']}] {message['content']}")
    while True:
        typer.echo(KEYS)
        key = click.getchar().lower()
        if key in ("q", "\x03", "\x04"):
            return None
        if key == "s":
            return "skip"
        if key == "a":
            typer.echo("accepted")
            return make_decision(candidate, "accept", reviewer)
        if key == "r":
            reason = typer.prompt("reason", default="", show_default=False).strip()
            if not reason:
                typer.echo("a reject needs a reason (it tells the teacher what to avoid)")
                continue
            typer.echo("rejected")
            return make_decision(candidate, "reject", reviewer, reason=reason)
        if key == "e":
            answer = read_answer(answer_of(candidate))
            if answer is None:
                continue
            typer.echo("edited")
            return make_decision(candidate, "edit", reviewer, answer=answer)


def read_answer(current: str) -> str | None:
    """The edited answer: lines typed until a line with a single '.'; an empty answer cancels."""
    typer.echo("new answer (end with a line holding only '.'; nothing cancels):")
    lines = []
    while True:
        line = input()
        if line == ".":
            break
        lines.append(line)
    answer = "\n".join(lines).strip()
    return answer if answer and answer != current else None


def resume_run(artifacts_dir: Path, pending: PendingBatch, reviewer: str) -> None:
    """Resume the paused flow run with the batch's decisions as its form input."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if pending.run_id == "local":
        typer.echo("decisions stored; the run was not a Prefect run: re-run the recipe to go on")
        return
    candidates = read_candidates(pending)
    form = to_form_input(candidates, read_decisions(artifacts_dir, pending.batch), reviewer)
    api_url = os.environ.get("PREFECT_API_URL") or pending.api_url
    try:
        with temporary_settings({PREFECT_API_URL: api_url} if api_url else {}):
            resume_flow_run(UUID(pending.run_id), run_input=form)
    except Exception as error:  # noqa: BLE001 - the decisions are stored; a re-run goes on from them
        typer.echo(
            f"decisions stored, but run {pending.run_name} could not be resumed ({error}); "
            "re-run the recipe: it goes on without asking again"
        )
        return
    typer.echo(f"run {pending.run_name} resumed")
