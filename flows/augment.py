"""The augmentation loop with its human review checkpoints.

    augment round -> review (pause until decided) -> mistakes into the next prompt -> ... -> stop
    -> augment stage (collected + accepted records), which clean reads

`augment_rounds` is the loop; the `finetune` flow calls it between collect and clean, inline
rather than as a subflow, so a review pause (or, in a deployment, a suspension) holds the run a
person sees and the deployment can reschedule. The `augment` flow runs sources -> collect ->
augmentation alone, to grow a dataset without training.

The review checkpoint's loop is core code (tuneline.augment.checkpoint: stored decisions, the auto
policy, asking until the batch is complete); this module gives it the Prefect parts: the form
(`ReviewForm`, one row per candidate: decision, reason, answer), the pause (in a deployment, the
suspension) that waits for it, and the run's identity. The form is in the UI whichever way the
recipe says people review; `tuneline review decide` (terminal) and `tuneline review import` (file)
store their decisions, then resume the run with the same form data.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, unmapped
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field
from tuneline.tasks.augment import augment_merge, augment_round, report_rounds, show_review_request
from tuneline.tasks.stages import collect, fetch, tidy_store

from tuneline.augment.checkpoint import review_instructions, review_round, review_timeout
from tuneline.augment.review import PendingBatch
from tuneline.augment.rounds import ReviewedRound, next_round_or_stop
from tuneline.errors import quiet_user_errors
from tuneline.objectstore import open_artifacts
from tuneline.recipe import AugmentSpec, Recipe, RecipeError, RegisterSpec, ReviewSpec
from tuneline.store import StageRef

POLL_INTERVAL_S = 2  # how often a paused run asks the server whether it was resumed


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
    quiet_user_errors()  # a worker's log shows a user's mistake without a traceback
    if recipe.augment is None:
        raise RecipeError(
            "recipe", ["augment: the augment flow needs this section (see recipes/augment_demo.yaml)"]
        )
    artifacts_dir = open_artifacts(recipe.artifacts_dir, recipe.work_dir)
    tidy_store(artifacts_dir)  # a killed run's temporary stage folders
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
        generated = augment_round(artifacts_dir, spec, collected, round_no, history)
        decisions = review_round(
            artifacts_dir,
            spec.review,
            generated,
            round_no,
            wait=partial(wait_for_review, spec.review),
            run_id=str(flow_run.get_id() or "local"),
            run_name=flow_run.get_name() or "local",
            api_url=PREFECT_API_URL.value(),
            announce=show_review_request,
        )
        history.append(ReviewedRound(round_no=round_no, generated=generated, decisions=decisions))
        stop = next_round_or_stop(history, spec)
        # The table is refreshed every round; MLflow gets one run with every round, once they end.
        tracking = register if stop is not None else None
        rows = report_rounds(artifacts_dir, history, tracking, flow_run.get_name() or "local")
    logger.info("augmentation stopped: %s", stop)
    return augment_merge(artifacts_dir, collected, history), rows


def wait_for_review(
    spec: ReviewSpec,
    pending: PendingBatch,
    initial_form_data: dict[str, Any],
    problems: list[str],
    attempt: int,
) -> dict[str, Any]:
    """Pause (in a deployment: suspend) until the form is submitted, and return its data; a
    timeout fails the run naming the batch and how to finish it."""
    description = review_instructions(pending, [spec.how], problems)
    form = ReviewForm.with_initial_data(description=description, **initial_form_data)
    key = f"review-{pending.batch}-{attempt}"
    try:
        if deployment.get_id():  # a deployment's run is rescheduled on resume: free the worker meanwhile
            submitted = suspend_flow_run(wait_for_input=form, timeout=spec.timeout_s, key=key)
        else:
            submitted = pause_flow_run(
                wait_for_input=form, timeout=spec.timeout_s, poll_interval=POLL_INTERVAL_S, key=key
            )
    except FlowPauseTimeout:
        raise review_timeout(pending, spec.timeout_s) from None
    return submitted.model_dump()
