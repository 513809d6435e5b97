"""The review checkpoint's loop: a round's candidates decided, each submission stored, none asked twice.

    finished batch            -> its stored decisions, nobody is asked
    review.how auto           -> the auto policy's decisions, nobody is asked
    otherwise                 -> announce the batch, then ask (`wait`) until every candidate has a decision

The loop knows nothing of Prefect: the flow passes its pause (in a deployment, its suspension) as
`wait`, and the run's identity as plain values, so the loop is tested with a plain function. A
submitted form is stored row by row before anything else, so a form with problems (a reject without
a reason) keeps its good rows and the next ask lists the problems. A batch the terminal or an
import finished while the run waited is taken as it is. After MAX_SUBMISSIONS forms with problems
the run gives up with a ReviewTimeout that says how to finish the batch.

How reviewers decide a batch is worded here once (`review_ways`, `review_instructions`): the form,
the run's note in the UI, the timeout errors and the CLI show the same lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tuneline.augment.review import (
    PendingBatch,
    ReviewTimeout,
    auto_decide,
    batch_digest,
    finish_batch,
    finished_decisions,
    from_form_input,
    now,
    open_batch,
    read_decisions,
    record_decision,
    review_command_line,
    to_form_input,
    undecided,
)
from tuneline.augment.rounds import CANDIDATES, read_candidates
from tuneline.recipe import ReviewSpec
from tuneline.store import StageRef

MAX_SUBMISSIONS = 20  # forms with problems accepted before the run gives up on the form
WAYS = ("prefect", "terminal", "file")  # the review.how values a person decides with
OFFLINE_WAYS = ("terminal", "file")  # what still works once the run has stopped waiting
FILL_IN = "fill in decision (accept, reject or edit), reason and edited_answer"


class Wait(Protocol):
    """Show the batch's form pre-filled with `initial_form_data` (and the last submission's
    `problems`) and return the submitted form data: `{"reviewer": ..., "rows": [...]}`.

    `attempt` counts the asks for this batch from 1, so a suspended run that re-executes finds the
    same ask again. Raises ReviewTimeout (see `review_timeout`) when nobody answers in time.
    """

    def __call__(
        self, pending: PendingBatch, initial_form_data: dict[str, Any], problems: list[str], attempt: int
    ) -> dict[str, Any]: ...


def review_round(
    artifacts_dir: str | Path,
    spec: ReviewSpec,
    generated: StageRef,
    round_no: int,
    *,
    wait: Wait,
    run_id: str,
    run_name: str,
    api_url: str | None = None,
    announce: Callable[[PendingBatch], None] | None = None,
) -> list[dict[str, Any]]:
    """Decisions on one round's candidates (plain dicts, in candidate order): the stored ones of a
    finished batch, the auto policy's, or the reviewers' through `wait`.

    `run_id`/`run_name` name the run reviewers decide for and `api_url` the Prefect API that resumes
    it; they are written to the pending file the CLI reads. `announce` is told once the batch waits.
    """
    candidates = read_candidates(generated)
    if not candidates:
        return []
    batch = batch_digest(candidates)
    done = finished_decisions(artifacts_dir, batch)
    if done is not None:
        return done
    if spec.how == "auto":
        return finish_batch(artifacts_dir, batch, candidates, auto_decide(spec.auto, candidates))

    pending = PendingBatch(
        batch=batch,
        run_id=run_id,
        run_name=run_name,
        round=round_no,
        candidates_path=str(generated.file(CANDIDATES)),
        count=len(candidates),
        how=spec.how,
        created_at=now(),
        api_url=api_url,
    )
    open_batch(artifacts_dir, pending)
    if announce is not None:
        announce(pending)
    return ask_until_decided(artifacts_dir, pending, candidates, spec.reviewer, wait)


def ask_until_decided(
    artifacts_dir: str | Path,
    pending: PendingBatch,
    candidates: list[dict[str, Any]],
    reviewer: str,
    wait: Wait,
) -> list[dict[str, Any]]:
    """Ask until every candidate of the pending batch has a decision, storing each submission's
    usable rows; gives up with ReviewTimeout after MAX_SUBMISSIONS forms."""
    problems: list[str] = []
    for attempt in range(1, MAX_SUBMISSIONS + 1):
        made = read_decisions(artifacts_dir, pending.batch)
        form = wait(pending, to_form_input(candidates, made, reviewer), problems, attempt)
        done = finished_decisions(artifacts_dir, pending.batch)  # the terminal or an import finished it
        if done is not None:
            return done
        decisions, problems = from_form_input(candidates, form)
        for decision in decisions:
            record_decision(artifacts_dir, pending.batch, decision)
        if not problems and not undecided(candidates, read_decisions(artifacts_dir, pending.batch)):
            return finish_batch(artifacts_dir, pending.batch, candidates, [])
    ways = "; or ".join(review_ways(pending.run_name, OFFLINE_WAYS))
    raise ReviewTimeout(
        f"batch {pending.batch}: {MAX_SUBMISSIONS} review forms had problems ({'; '.join(problems)}); "
        f"the decisions so far are kept: finish the batch ({ways}), then re-run the recipe"
    )


def review_ways(run_name: str, ways: Sequence[str] = WAYS) -> list[str]:
    """One line per way of deciding a batch of run `run_name` (review.how values, in order)."""
    lines = {
        "prefect": "Prefect UI: the run's **Resume** form, one row per candidate",
        "terminal": f"terminal: `{review_command_line('decide', run_name)}`",
        "file": f"file: `{review_command_line('export', run_name, '--to', 'review.csv')}`, {FILL_IN}, "
        f"then `{review_command_line('import', 'review.csv')}`",
    }
    return [lines[way] for way in ways]


def review_instructions(
    pending: PendingBatch, ways: Sequence[str] = WAYS, problems: Sequence[str] = ()
) -> str:
    """What waits and how to decide it, as markdown: the form's description (the recipe's way and
    the last submission's problems) and the run's note in the UI (every way)."""
    parts = [
        f"**Round {pending.round}: {pending.count} candidates wait for review** (batch `{pending.batch}`, "
        f"candidates in `{pending.candidates_path}`). For each: accept, reject with a reason, or edit "
        "the answer.",
        "\n".join(f"- {line}" for line in review_ways(pending.run_name, ways)),
    ]
    if problems:
        parts.append("The last submission was not complete:\n" + "\n".join(f"- {p}" for p in problems))
    return "\n\n".join(parts)


def review_timeout(pending: PendingBatch, timeout_s: float) -> ReviewTimeout:
    """The error of a review nobody did within `review.timeout_s`: what is kept and how to go on."""
    ways = "; or ".join(review_ways(pending.run_name, OFFLINE_WAYS))
    return ReviewTimeout(
        f"round {pending.round}: nobody reviewed batch {pending.batch} within review.timeout_s="
        f"{timeout_s}. Its {pending.count} candidates are kept in {pending.candidates_path} with the "
        f"decisions made so far. Decide the rest ({ways}), then re-run the recipe (it asks only about "
        "undecided candidates); or raise review.timeout_s"
    )
