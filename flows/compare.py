"""People compare the tuned model's replies blind, between evaluate and register.

    compare_open (sample pairs, store the batch) -> wait for answers (pause / suspend / later)
    -> compare (the stage: outcomes, judge verdicts, Elo and Bradley-Terry over the ledger)

`compare_replies` is called inline by the `finetune` flow, like the augmentation loop, so the
pause holds the run a person sees. The form (`CompareForm`) has one row per unanswered pair:
the prompt, reply A, reply B and a winner to pick. `tuneline compare decide` (terminal) and
`tuneline compare import` (file) store their answers and resume the run with the same form data.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field
from tuneline.tasks.compare import compare, compare_open, show_compare_request

from tuneline.evaluate.compare import (
    PendingComparison,
    ask_until_decided,
    compare_instructions,
    compare_timeout,
    finished_answers,
)
from tuneline.recipe import HumanSpec
from tuneline.store import StageRef

POLL_INTERVAL_S = 2  # how often a paused run asks the server whether it was resumed


class CompareRow(BaseModel):
    """One blind pair in the form."""

    id: str = Field(description="Comparison id (leave as is).")
    prompt: str = Field(description="What the user asked (context only).")
    reply_a: str = Field(description="Reply A (context only).")
    reply_b: str = Field(description="Reply B (context only).")
    winner: Literal["undecided", "A", "B", "tie"] = Field(
        description="The better reply: A, B or tie; undecided rows are asked again."
    )


class CompareForm(RunInput):
    """The form of a paused comparison: who answers, and one row per pair."""

    rater: str = Field(description="Your name, recorded with every answer.")
    rows: list[CompareRow]


def compare_replies(
    artifacts_dir: Path,
    human: HumanSpec,
    evaluated: StageRef,
    model_name: str,
    base_name: str,
    judged: StageRef | None = None,
) -> StageRef | None:
    """The compare stage once people answered the batch; None when `wait: later` left it open."""
    run = {
        "id": str(flow_run.get_id() or ""),
        "name": flow_run.get_name(),
        "api_url": PREFECT_API_URL.value(),
    }
    pending = compare_open(artifacts_dir, human, evaluated, model_name, base_name, run)
    if finished_answers(artifacts_dir, pending.batch) is None:
        show_compare_request(pending)
        if human.wait == "later":
            get_run_logger().info(
                "%d blind comparisons wait (batch %s); the run goes on without them",
                pending.count,
                pending.batch,
            )
            return None
        ask_until_decided(artifacts_dir, pending, human.rater, wait=partial(wait_for_answers, human))
    return compare(artifacts_dir, human, evaluated, pending.batch, model_name, base_name, judged)


def wait_for_answers(
    human: HumanSpec, pending: PendingComparison, initial_form_data: dict[str, Any], attempt: int
) -> dict[str, Any]:
    """Pause (suspend, when the recipe says so and the run is a deployment's) until the form is
    submitted, and return its data; a timeout fails the run naming the batch and how to finish it."""
    form = CompareForm.with_initial_data(description=compare_instructions(pending), **initial_form_data)
    key = f"compare-{pending.batch}-{attempt}"
    try:
        if human.wait == "suspend" and deployment.get_id():  # the worker is freed meanwhile
            submitted = suspend_flow_run(wait_for_input=form, timeout=human.timeout_s, key=key)
        else:
            submitted = pause_flow_run(
                wait_for_input=form, timeout=human.timeout_s, poll_interval=POLL_INTERVAL_S, key=key
            )
    except FlowPauseTimeout:
        raise compare_timeout(pending, human.timeout_s) from None
    return submitted.model_dump()
