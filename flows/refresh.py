"""The `refresh` flow: look at the sources again on a schedule; retrain only when the data changed.

    fetch (each source, looking again) -> collect -> refresh_check
      unchanged -> refresh_record (nothing downstream runs)
      changed   -> the finetune flow's body on the pinned test set (clean ... register) -> refresh_record

The recipe's `refresh` section is the deployment's schedule (`RefreshSpec.schedule()`). A refresh
passes its run's id to fetch as the refresh token: crawls crawl again, URLs without validators are
downloaded again (tuneline.sources.fetch). The collected data's content digest decides, against
the state the last refresh left (tuneline.refresh). When it trains, the new model is scored beside
the champion on a test set that stays the same across refreshes (`split.test_file`, pinned by the
first refresh when the recipe names none), and the register stage promotes it only on a win.
Review of generated data goes through the finetune flow's code, so in a deployment it suspends the
run until people decide; on resume the same run id finds the same fetch stages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from tuneline.flows.finetune import run_from_collected
from tuneline.tasks.stages import check_evaluate, collect, fetch, save_recipe, tidy_store

from tuneline.errors import quiet_user_errors
from tuneline.experiment import check_tracking_store
from tuneline.objectstore import open_artifacts
from tuneline.recipe import Recipe
from tuneline.refresh import (
    change_reason,
    collected_digest,
    now,
    pin_test_split,
    read_state,
    recipe_digest,
    refresh_markdown,
    with_test_file,
    write_state,
)
from tuneline.store import StageRef

# What the state and the flow's result keep of the register stage's stats.
REGISTERED_KEYS = ("model_uri", "version", "promoted", "reason", "aliases", "champion_version_before")


@flow(name="refresh")
def refresh(recipe: Recipe) -> dict:
    """Re-fetch the recipe's sources; when the collected data (or the recipe) changed since the last
    refresh, run the pipeline and register the model, promoted only if it beats the champion on
    the pinned test set. Returns status ("unchanged" or "trained"), digest, registered, promoted,
    run_dir, test_file and reason."""
    quiet_user_errors()  # a worker's log shows a user's mistake without a traceback
    artifacts_dir = open_artifacts(recipe.artifacts_dir, recipe.work_dir)
    started = datetime.now(UTC)
    token = str(flow_run.get_id() or started.isoformat())  # the same on a suspended run's resume
    tidy_store(artifacts_dir)
    fetched = fetch.map(unmapped(artifacts_dir), recipe.sources, unmapped(token)).result()
    collected = collect(artifacts_dir, recipe.sources, fetched)
    checked = refresh_check(artifacts_dir, recipe, collected)
    if checked["reason"] is None:
        since = (checked["state"] or {}).get("trained_at")
        return refresh_record(artifacts_dir, recipe, unchanged_result(checked["digest"], since))
    check_evaluate(recipe.evaluate)  # a bad suite, rubric or benchmark name fails before any work
    check_tracking_store(recipe.register.tracking_uri)  # so does a database store that is down
    pinned = with_test_file(recipe, checked["state"])
    run_dir = artifacts_dir / "runs" / f"{started:%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"
    save_recipe(run_dir, pinned)
    summary = run_from_collected(artifacts_dir, pinned, collected, run_dir, started)
    registered = {key: (summary.get("registry") or {}).get(key) for key in REGISTERED_KEYS}
    result = {
        "status": "trained",
        "digest": checked["digest"],
        "reason": checked["reason"],
        "registered": registered,
        "promoted": bool(registered["promoted"]),
        "run_dir": str(run_dir),
        "test_file": pinned.split.test_file,  # None on the first refresh: refresh_record pins it
        "split_dir": summary["stage_dirs"]["split"],
    }
    return refresh_record(artifacts_dir, recipe, result)


def unchanged_result(digest: str, since: str | None) -> dict[str, Any]:
    """The flow's result when nothing changed: no run, no registration."""
    return {
        "status": "unchanged", "digest": digest, "reason": None, "registered": None,
        "promoted": False, "run_dir": None, "test_file": None, "since": since,
    }  # fmt: skip


@task(name="refresh_check", cache_policy=NO_CACHE)
def refresh_check(artifacts_dir: Path, recipe: Recipe, collected: StageRef) -> dict[str, Any]:
    """The collected data's content digest, the last refresh's state and why this one trains
    (None: nothing changed)."""
    state = read_state(artifacts_dir, recipe.name)
    digest = collected_digest(collected)
    return {"digest": digest, "state": state, "reason": change_reason(state, digest, recipe)}


@task(name="refresh_record", cache_policy=NO_CACHE)
def refresh_record(artifacts_dir: Path, recipe: Recipe, result: dict[str, Any]) -> dict[str, Any]:
    """Pin the first trained refresh's test split, write the recipe's refresh state and say in the
    UI what happened (the `refresh` markdown artifact)."""
    state = read_state(artifacts_dir, recipe.name) or {}
    if result["status"] == "unchanged":
        state["checked_at"] = now()
    else:
        split_dir = Path(result.pop("split_dir"))
        if recipe.split.test_file is None and not state.get("test_file"):
            result["test_file"] = str(pin_test_split(artifacts_dir, recipe.name, split_dir))
        state = {
            "digest": result["digest"],
            "recipe_digest": recipe_digest(recipe),
            "trained_at": now(),
            "checked_at": now(),
            "run": flow_run.get_name() or "local",
            "run_dir": result["run_dir"],
            "registered": result["registered"],
            "test_file": result["test_file"],
        }
    write_state(artifacts_dir, recipe.name, state)
    create_markdown_artifact(refresh_markdown(result), key="refresh", description="What this refresh did")
    return result
