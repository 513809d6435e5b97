"""`tuneline review`: decide a paused augmentation round in a terminal or through a file.

    tuneline review                    list what waits, then review the oldest batch
    tuneline review RUN                review the batch of that run (flow run id or name)
    tuneline review export RUN --to review.csv|review.jsonl
    tuneline review import review.csv

Each decision is stored the moment it is made (tuneline.augment.review's journal), so `q`, Ctrl-C or a
closed terminal keeps every decision so far; the next `tuneline review` goes on with the rest.
When a batch is complete the paused flow run is resumed through the Prefect API with the same
form data the UI would send. Prefect is imported only for that resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer

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
    to_form_input,
    undecided,
)

KEYS = "[a]ccept  [r]eject  [e]dit  [s]kip  [q]uit (decisions so far are kept)"


def review_command(
    target: Annotated[str | None, typer.Argument(help="RUN, or `export` / `import`.")] = None,
    argument: Annotated[str | None, typer.Argument(help="export: RUN; import: FILE.")] = None,
    to: Annotated[Path | None, typer.Option(help="export: the .csv or .jsonl file to write.")] = None,
    artifacts_dir: Annotated[
        Path, typer.Option("--artifacts-dir", help="The recipe's artifacts_dir.")
    ] = Path(".tuneline"),
    reviewer: Annotated[
        str, typer.Option(help="Name recorded with your decisions.", envvar="TUNELINE_REVIEWER")
    ] = os.environ.get("USER", "reviewer"),
    resume: Annotated[bool, typer.Option(help="Resume the paused run once the batch is decided.")] = True,
) -> None:
    """Review augmentation candidates: in the terminal, or exported to a file and imported back."""
    try:
        if target == "export":
            if not argument or to is None:
                raise ReviewError("usage: tuneline review export RUN --to review.csv (or .jsonl)")
            pending = find_pending(artifacts_dir, argument)
            count = export_batch(artifacts_dir, pending, to)
            typer.echo(
                f"{count} candidates of round {pending.round} written to {to}; fill in decision "
                "(accept/reject/edit), reason and edited_answer, then `tuneline review import " + f"{to}`"
            )
            return
        if target == "import":
            if not argument:
                raise ReviewError("usage: tuneline review import FILE")
            pending, final = import_decisions(artifacts_dir, argument, reviewer)
            if final is None:
                left = undecided(read_candidates(pending), read_decisions(artifacts_dir, pending.batch))
                typer.echo(f"stored; {len(left)} candidates of batch {pending.batch} still have no decision")
                return
            typer.echo(f"batch {pending.batch}: all {len(final)} candidates decided")
            if resume:
                resume_run(artifacts_dir, pending, reviewer)
            return
        review_in_terminal(artifacts_dir, target, reviewer, resume)
    except ReviewError as error:
        typer.secho(str(error), err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def review_in_terminal(artifacts_dir: Path, run: str | None, reviewer: str, resume: bool) -> None:
    """List the pending batches, then take decisions on the chosen one, key by key."""
    waiting = list_pending(artifacts_dir, run)
    if not waiting:
        typer.echo(f"nothing waits for review{f' for {run}' if run else ''} in {artifacts_dir}")
        return
    for pending in waiting:
        typer.echo(
            f"- run {pending.run_name} ({pending.run_id[:8]}) round {pending.round}: {pending.count} "
            f"candidates, batch {pending.batch}"
        )
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
            typer.echo(f"stopped; {len(made)} decisions kept. `tuneline review {pending.run_name}` goes on.")
            return
        if decision == "skip":
            continue
        record_decision(artifacts_dir, pending.batch, decision)
        made[decision.id] = decision
    if undecided(candidates, made):
        typer.echo(f"{len(undecided(candidates, made))} skipped candidates still wait for a decision")
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
