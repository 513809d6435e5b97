"""The augmentation loop with its human review checkpoints.

    generate round -> review (pause until decided) -> mistakes into the next prompt -> ... -> stop
    -> augment stage (collected + accepted records), which clean reads

`augment_rounds` is the loop; the `finetune` flow calls it between collect and clean, inline
rather than as a subflow, so a review pause (or, in a deployment, a suspension) holds the run a
person sees and the deployment can reschedule. The `augment` flow runs sources -> collect ->
augmentation alone, to grow a dataset without training.

The review checkpoint pauses the run with a pre-filled form (one row per candidate: decision,
reason, answer) whichever way the recipe says people review: the form is in the UI, and
`tuneline review` (terminal) and `tuneline review import` (file) store their decisions, then
resume the run with the same form data. The decision store (tuneline.augment.review) is the source of
truth: a finished batch is never asked about again, so a re-run, or a suspended run whose body
runs again, goes straight on. A submitted form breaking a rule (a reject without a reason) is not
lost: its good rows are stored and the run pauses again, showing the problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, unmapped
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field
from tuneline.tasks.augment import augment_merge, generate_round, report_rounds, show_review_request
from tuneline.tasks.stages import collect, fetch

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
    to_form_input,
    undecided,
)
from tuneline.augment.rounds import ReviewedRound, next_round_or_stop, read_candidates
from tuneline.recipe import AugmentSpec, Recipe, RecipeError, RegisterSpec, ReviewSpec
from tuneline.store import StageRef

POLL_INTERVAL_S = 2  # how often a paused run asks the server whether it was resumed
MAX_SUBMISSIONS = 20  # forms with problems accepted before the run gives up on the UI


class ReviewRow(BaseModel):
    """One candidate in the review form."""

    id: str = Field(description="Candidate id (leave as is).")
    question: str = Field(description="What the user asks (context only; changes here are ignored).")
    answer: str = Field(description="The teacher's answer; change it to edit the candidate.")
    decision: Literal["accept", "reject", "edit"] = Field(
        description="accept, reject (give a reason) or edit."
    )
    reason: str = Field("", description="Why it is rejected: fed back to the teacher as a common mistake.")


class ReviewForm(RunInput):
    """The form of a paused augmentation round: who reviews, and one row per candidate."""

    reviewer: str = Field(description="Your name, recorded with every decision.")
    rows: list[ReviewRow]


@flow(name="augment")
def augment(recipe: Recipe) -> dict:
    """Collect the recipe's sources and grow them with reviewed teacher rounds (no training)."""
    if recipe.augment is None:
        raise RecipeError(
            "recipe", ["augment: the augment flow needs this section (see recipes/augment_demo.yaml)"]
        )
    artifacts_dir = Path(recipe.artifacts_dir).resolve()
    fetched = fetch.map(unmapped(artifacts_dir), recipe.sources).result()
    collected = collect(artifacts_dir, recipe.sources, fetched)
    augmented, rounds = augment_rounds(artifacts_dir, recipe.augment, collected, recipe.register)
    return {"augment": augmented.path, "rounds": rounds}


def augment_rounds(
    artifacts_dir: Path, spec: AugmentSpec, collected: StageRef, register: RegisterSpec | None = None
) -> tuple[StageRef, list[dict[str, Any]]]:
    """Rounds of generation and review until a stop rule holds; the augment stage and round counts."""
    logger = get_run_logger()
    history: list[ReviewedRound] = []
    rows: list[dict[str, Any]] = []
    stop = None
    while stop is None:
        round_no = len(history) + 1
        generated = generate_round(artifacts_dir, spec, collected, round_no, history)
        decisions = review_round(artifacts_dir, spec.review, generated, round_no)
        history.append(ReviewedRound(round_no=round_no, generated=generated, decisions=decisions))
        stop = next_round_or_stop(history, spec)
        # The table is refreshed every round; MLflow gets one run with every round, once they end.
        tracking = register if stop is not None else None
        rows = report_rounds(artifacts_dir, history, tracking, flow_run.get_name() or "local")
    logger.info("augmentation stopped: %s", stop)
    return augment_merge(artifacts_dir, collected, history), rows


def review_round(
    artifacts_dir: Path, spec: ReviewSpec, generated: StageRef, round_no: int
) -> list[dict[str, Any]]:
    """Decisions on one round's candidates: stored ones, the auto policy's, or a person's."""
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
        run_id=str(flow_run.get_id() or "local"),
        run_name=flow_run.get_name() or "local",
        round=round_no,
        candidates_path=str(generated.file("candidates.jsonl")),
        count=len(candidates),
        how=spec.how,
        created_at=now(),
        api_url=PREFECT_API_URL.value(),
    )
    open_batch(artifacts_dir, pending)
    show_review_request(pending)
    problems: list[str] = []
    for attempt in range(1, MAX_SUBMISSIONS + 1):
        made = read_decisions(artifacts_dir, batch)
        form = wait_for_review(
            spec, pending, to_form_input(candidates, made, spec.reviewer), problems, attempt
        )
        done = finished_decisions(artifacts_dir, batch)  # the terminal or an import finished it
        if done is not None:
            return done
        decisions, problems = from_form_input(candidates, form.model_dump())
        for decision in decisions:
            record_decision(artifacts_dir, batch, decision)
        if not problems and not undecided(candidates, read_decisions(artifacts_dir, batch)):
            return finish_batch(artifacts_dir, batch, candidates, [])
    raise ReviewTimeout(
        f"batch {batch}: {MAX_SUBMISSIONS} review forms had problems ({'; '.join(problems)}); "
        f"the decisions so far are kept: finish with `tuneline review {pending.run_name}`"
    )


def wait_for_review(
    spec: ReviewSpec, pending: PendingBatch, initial: dict[str, Any], problems: list[str], attempt: int
) -> ReviewForm:
    """Pause (in a deployment: suspend) until the form is submitted; a timeout fails clearly."""
    how = {
        "prefect": "fill in this form and resume the run",
        "terminal": f"run `tuneline review {pending.run_name}`",
        "file": f"run `tuneline review export {pending.run_name} --to review.csv`, fill in decision, "
        "reason and edited_answer, then `tuneline review import review.csv`",
    }[spec.how]
    description = (
        f"**Round {pending.round}: {pending.count} candidates wait for review** (batch `{pending.batch}`). "
        f"For each: accept, reject with a reason, or edit the answer. To review: {how}."
    )
    if problems:
        description += "\n\nThe last submission was not complete:\n" + "\n".join(f"- {p}" for p in problems)
    form = ReviewForm.with_initial_data(description=description, **initial)
    key = f"review-{pending.batch}-{attempt}"
    try:
        if deployment.get_id():  # a deployment's run is rescheduled on resume: free the worker meanwhile
            return suspend_flow_run(wait_for_input=form, timeout=spec.timeout_s, key=key)
        return pause_flow_run(
            wait_for_input=form, timeout=spec.timeout_s, poll_interval=POLL_INTERVAL_S, key=key
        )
    except FlowPauseTimeout:
        raise ReviewTimeout(
            f"round {pending.round}: nobody reviewed batch {pending.batch} within review.timeout_s="
            f"{spec.timeout_s}. Its {pending.count} candidates are kept in {pending.candidates_path} with "
            f"the decisions made so far. Decide the rest with `tuneline review {pending.run_name}` or "
            f"`tuneline review export {pending.run_name} --to review.csv` + `tuneline review import "
            "review.csv`, then re-run the recipe (it asks only about undecided candidates); or raise "
            "review.timeout_s"
        ) from None
