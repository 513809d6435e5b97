"""Prefect tasks of the augmentation loop: generate a round, merge the accepted records, report.

Thin wrappers over tuneline.augment.rounds: they resolve the teacher's API key (a Prefect Secret block
when the recipe names one), retry a round whose teacher was unreachable (and nothing else),
show each round's prompt and counts in the UI and log token counts to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from tuneline.tasks.stages import retry_network_errors

from tuneline.augment.review import PendingBatch
from tuneline.augment.rounds import (
    PROMPT,
    ReviewedRound,
    round_summary,
    run_augment_merge,
    run_generate_round,
)
from tuneline.recipe import AugmentSpec, RegisterSpec, TeacherSpec
from tuneline.store import StageRef


def teacher_api_key(teacher: TeacherSpec) -> str | None:
    """The teacher's key from the Prefect Secret block named in the recipe; None leaves the core
    to read the environment variable `teacher.api_key_env`."""
    if not teacher.api_key_secret:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(teacher.api_key_secret).get()


@task(
    name="generate_round",
    task_run_name="generate-round-{round_no}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_network_errors,
    cache_policy=NO_CACHE,
)
def generate_round(
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
    """Tell reviewers in the UI what waits and the ways to decide it."""
    create_markdown_artifact(
        f"## Round {pending.round}: {pending.count} candidates wait for review\n\n"
        f"- batch `{pending.batch}`, candidates in `{pending.candidates_path}`\n"
        "- Prefect UI: open this run and press **Resume**: the form has one row per candidate\n"
        f"- terminal: `tuneline review {pending.run_name}`\n"
        f"- file: `tuneline review export {pending.run_name} --to review.csv`, then "
        "`tuneline review import review.csv`\n",
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
    table = [
        {**row, "auto_rejected": ", ".join(f"{k}: {v}" for k, v in row["auto_rejected"].items()) or "-"}
        for row in rows
    ]
    create_table_artifact(
        table, key="augment-rounds", description="Candidates, decisions and tokens per round"
    )
    if register is not None:
        log_token_counts(register, Path(artifacts_dir) / "mlartifacts", run_name, rows)
    return rows


def log_token_counts(
    register: RegisterSpec, mlartifacts_dir: Path, run_name: str, rows: list[dict[str, Any]]
) -> None:
    """One MLflow run per augmentation; each round's counts and tokens are a step of its metrics."""
    import mlflow

    from tuneline.register.stage import ensure_experiment, prepare_tracking_uri

    prepare_tracking_uri(register.tracking_uri)
    mlflow.set_tracking_uri(register.tracking_uri)
    experiment_id = ensure_experiment(register.experiment, mlartifacts_dir)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"augment-{run_name}"):
        for row in rows:
            metrics = {
                key: float(row[key])
                for key in ("prompt_tokens", "completion_tokens", "generated", "accepted", "edited",
                            "rejected_in_review", "acceptance_rate")
            }  # fmt: skip
            mlflow.log_metrics(metrics, step=row["round"])
