"""Prefect tasks of the blind comparison: open a batch, write the compare stage, show the ratings.

Thin wrappers over tuneline.evaluate.compare and tuneline.evaluate.compare_stage; the wait for
people's answers is in the flow (tuneline.flows.compare), since only a flow can pause.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tuneline.evaluate.compare import (
    PendingComparison,
    build_items,
    compare_instructions,
    model_ids,
    now,
    open_comparison,
)
from tuneline.evaluate.compare_stage import run_compare
from tuneline.pipeline import COMPARE
from tuneline.recipe import HumanSpec
from tuneline.store import StageRef, iter_records, read_stats


@task(name="compare_open", cache_policy=NO_CACHE)
def compare_open(
    artifacts_dir: Path,
    human: HumanSpec,
    evaluated: StageRef,
    model_name: str,
    base_name: str,
    run: dict[str, str | None],
) -> PendingComparison:
    """Sample the blind pairs from the evaluate stage's predictions and store them as a batch (once);
    the batch is announced as waiting unless its answers are complete. `run`: the run's id, name and
    Prefect API, for the CLI that resumes it."""
    ids = model_ids(artifacts_dir, evaluated, base_name, model_name)
    batch, items = build_items(iter_records(evaluated, "predictions.jsonl"), human, ids)
    pending = PendingComparison(
        batch=batch,
        run_id=run["id"] or "local",
        run_name=run["name"] or "local",
        model_name=model_name,
        items_path=str(Path(artifacts_dir) / "compare" / batch / "items.jsonl"),
        count=len(items),
        wait=human.wait,
        created_at=now(),
        api_url=run["api_url"],
    )
    open_comparison(artifacts_dir, pending, items)
    return pending


def show_compare_request(pending: PendingComparison) -> None:
    """Tell people in the UI what waits for comparison and every way to answer."""
    create_markdown_artifact(
        compare_instructions(pending), key="compare-request", description="Blind comparisons waiting"
    )


@task(name=COMPARE.name, cache_policy=NO_CACHE)
def compare(
    artifacts_dir: Path,
    human: HumanSpec,
    evaluated: StageRef,
    batch: str,
    model_name: str,
    base_name: str,
    judged: StageRef | None = None,
) -> StageRef:
    """The compare stage of a finished batch; its leaderboard and this batch's pairs in the UI."""
    compared = run_compare(
        artifacts_dir, human, evaluated, batch, model_name=model_name, base_name=base_name, judged=judged
    )
    stats = read_stats(compared)
    create_table_artifact(
        stats["leaderboard"],
        key="leaderboard",
        description=f"Ratings of every model people compared for {model_name} "
        f"({stats['history']['battles']} comparisons): Elo, Bradley-Terry with its 95% interval",
    )
    rows = [{"against": pair, **counts} for pair, counts in stats["pairs"].items()]
    if rows:
        create_table_artifact(
            rows, key="comparisons", description="The tuned model in this batch, per opponent"
        )
    return compared
