"""Prefect tasks of the augmentation loop: an augment round, merge the accepted records, report.

Thin wrappers over tuneline.augment.rounds: they resolve the teacher's API key (a Prefect Secret block
when the recipe names one), retry a round whose teacher was unreachable (and nothing else),
show each round's prompt, what waits for review and the counts in the UI, and log token counts to
MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from tuneline.tasks.stages import network_retries, teacher_api_key

from tuneline.augment.checkpoint import review_instructions
from tuneline.augment.review import PendingBatch
from tuneline.augment.rounds import (
    PROMPT,
    ReviewedRound,
    round_summary,
    run_augment_merge,
    run_generate_round,
)
from tuneline.experiment import log_augment_rounds
from tuneline.pipeline import AUGMENT_ROUND
from tuneline.recipe import AugmentSpec, RegisterSpec
from tuneline.report import format_dropped
from tuneline.store import StageRef


@task(
    name=AUGMENT_ROUND.name,
    task_run_name="augment-round-{round_no}",
    **network_retries(backoff_factor=5),
    cache_policy=NO_CACHE,
)
def augment_round(
    artifacts_dir: Path, spec: AugmentSpec, source: StageRef, round_no: int, history: list[ReviewedRound]
) -> StageRef:
    """Ask the teacher for one round of candidates and check them; show the prompt it was sent."""
    generated = run_generate_round(
        artifacts_dir, spec, source, round_no, history, api_key=teacher_api_key(spec.teacher)
    )
    prompt = json.loads(generated.file(PROMPT).read_text(encoding="utf-8"))
    create_markdown_artifact(
        render_prompt(prompt),
        key=f"augment-prompt-round-{round_no}",
        description=f"Prompt sent to the teacher in round {round_no}",
    )
    return generated


def render_prompt(prompt: dict[str, Any], shown: int = 3) -> str:
    """A round's stored prompt (prompt.json) as markdown: its common mistakes and first requests."""
    requests = prompt.get("requests", [])
    parts = [
        f"# Round {prompt.get('round')}: {len(requests)} request(s) to the teacher",
        f"## Common mistakes fed back\n\n{prompt.get('mistakes') or '-'}",
    ]
    for number, request in enumerate(requests[:shown], start=1):
        parts.append(f"## Request {number}")
        for message in request["messages"]:
            parts.append(f"**{message['role']}**\n\n```\n{message['content']}\n```")
    if len(requests) > shown:
        parts.append(f"... and {len(requests) - shown} more in prompt.json")
    return "\n\n".join(parts)


@task(name="augment", cache_policy=NO_CACHE)
def augment_merge(artifacts_dir: Path, collected: StageRef, history: list[ReviewedRound]) -> StageRef:
    """The augment stage: collected records plus the accepted and edited candidates."""
    return run_augment_merge(artifacts_dir, collected, history)


def show_review_request(pending: PendingBatch) -> None:
    """Tell reviewers in the UI what waits and every way to decide it."""
    create_markdown_artifact(
        review_instructions(pending),
        key=f"review-round-{pending.round}",
        description="What waits for review",
    )


@task(name="augment_report", cache_policy=NO_CACHE)
def report_rounds(
    artifacts_dir: Path, history: list[ReviewedRound], register: RegisterSpec | None, run_name: str
) -> list[dict]:
    """Counts per round as a table in the UI; with `register`, every round's counts and tokens to
    one MLflow run (called once, after the last round)."""
    rows = [round_summary(reviewed) for reviewed in history]
    table = [{**row, "auto_rejected": format_dropped(row["auto_rejected"])} for row in rows]
    create_table_artifact(
        table, key="augment-rounds", description="Candidates, decisions and tokens per round"
    )
    if register is not None:
        log_augment_rounds(register.tracking_uri, register.experiment, artifacts_dir, run_name, rows)
    return rows
