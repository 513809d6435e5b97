"""What the `refresh` flow remembers between runs, and how it decides whether to train again.

The state of a recipe lies in `<artifacts_dir>/refresh/<recipe name>.json`, written atomically:
the collected data's content digest, the recipe's digest, when and in which run it was last
trained, the version that run registered, and the pinned test file. A refresh whose collected
data and recipe have the digests recorded there ends "unchanged" and trains nothing.

The content digest reads the records' ids (digests of their messages and tools) and the
documents' text, title and URL, as sorted lists: never the fetch time, the stage digests or the
order of the sources, which change on every re-fetch while the data does not.

A test split that changes with the data makes the champion comparison meaningless, so the first
refresh of a recipe without `split.test_file` copies that run's test split to
`<artifacts_dir>/refresh/<recipe name>/test.jsonl` (once: it is never written again) and every
later refresh uses it as `split.test_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneline.errors import UserError
from tuneline.recipe import Recipe
from tuneline.store import DOCUMENTS, RECORDS, StageRef, iter_records

STATE_DIR = "refresh"
PINNED_TEST = "test.jsonl"


def collected_digest(collected: StageRef) -> str:
    """The content digest of a collect stage: its records' ids and its documents' text, title and
    URL, each list sorted (what a re-fetch of the same data gives again)."""
    ids = sorted(record["id"] for record in iter_records(collected, RECORDS))
    documents = sorted(
        hashlib.sha256(json.dumps([doc.get("title"), doc.get("url"), doc["text"]]).encode()).hexdigest()
        for doc in iter_records(collected, DOCUMENTS)
    )
    return hashlib.sha256(json.dumps([ids, documents]).encode()).hexdigest()[:16]


def recipe_digest(recipe: Recipe) -> str:
    """The recipe as its author wrote it (before the refresh pinned a test file): a changed recipe
    trains again even when the data did not change."""
    return recipe.digest()


def state_path(artifacts_dir: str | Path, name: str) -> Path:
    return Path(artifacts_dir) / STATE_DIR / f"{name}.json"


def pinned_test_path(artifacts_dir: str | Path, name: str) -> Path:
    return Path(artifacts_dir) / STATE_DIR / name / PINNED_TEST


def read_state(artifacts_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The recipe's refresh state, or None before its first refresh."""
    path = state_path(artifacts_dir, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(
            f"{path}: not a refresh state ({error}); delete it to start the refresh history again "
            "(the next refresh then trains)"
        ) from None


def write_state(artifacts_dir: str | Path, name: str, state: dict[str, Any]) -> Path:
    """Write the state atomically: a temporary file renamed over the old one."""
    path = state_path(artifacts_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def change_reason(state: dict[str, Any] | None, digest: str, recipe: Recipe) -> str | None:
    """Why this refresh trains (first refresh, data changed, recipe changed), or None: unchanged."""
    if state is None:
        return "first refresh"
    if state.get("digest") != digest:
        return f"the collected data changed ({state.get('digest')} -> {digest})"
    if state.get("recipe_digest") != recipe_digest(recipe):
        return "the recipe changed"
    return None


def with_test_file(recipe: Recipe, state: dict[str, Any] | None) -> Recipe:
    """The recipe with the test file this refresh evaluates on: the recipe's own `split.test_file`,
    else the one an earlier refresh pinned, else the recipe as it is (this run pins one)."""
    if recipe.split.test_file is not None:
        return recipe
    if not state or not state.get("test_file"):
        if recipe.split.test == 0:  # nothing to pin: every later comparison would have no test set
            raise UserError(
                "refresh: split.test is 0 and split.test_file is unset, so there is no test set to compare "
                "each new model with the champion on; set split.test (e.g. 0.1: the first refresh pins "
                "its test split) or split.test_file"
            )
        return recipe
    pinned = Path(state["test_file"])
    if not pinned.is_file():
        raise UserError(
            f"refresh: the pinned test set {pinned} is gone (an earlier refresh of {recipe.name!r} wrote "
            f"it); restore it, or delete {state_path(recipe.work_dir, recipe.name)} to pin a new one "
            "(models registered before are then compared on another test set)"
        )
    return recipe.model_copy(update={"split": recipe.split.model_copy(update={"test_file": str(pinned)})})


def pin_test_split(artifacts_dir: str | Path, name: str, split_dir: Path) -> Path:
    """Copy a split stage's test split (in `split_dir`) to the recipe's pinned test file, unless
    one is there: the file is written once and never changes after."""
    target = pinned_test_path(artifacts_dir, name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    tmp.write_bytes((Path(split_dir) / "test.jsonl").read_bytes())
    os.replace(tmp, target)
    return target


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def refresh_markdown(result: dict[str, Any]) -> str:
    """What a refresh did, for the Prefect UI: unchanged, or trained and what the register decided."""
    lines = [f"# Refresh: {result['status']}", "", f"Collected data digest: `{result['digest']}`."]
    if result["status"] == "unchanged":
        lines.append(f"Unchanged since the refresh of {result.get('since')}: nothing downstream ran.")
        return "\n".join(lines)
    registered = result.get("registered") or {}
    lines += [
        f"Trained because {result['reason']}; evaluated on the test set `{result['test_file']}`.",
        "",
        f"Registered `{registered.get('model_uri')}`: "
        + ("promoted to champion." if result["promoted"] else "not promoted.")
        + (f" {registered['reason']}" if registered.get("reason") else ""),
        "",
        f"Run folder: `{result['run_dir']}`.",
    ]
    return "\n".join(lines)
