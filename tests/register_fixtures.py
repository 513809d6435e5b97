"""Shared setup of the register tests: a store with a split, finished train/evaluate stages made
from a tiny local model, and a child process that registers one of them (used to run two
registrations at once, or to die with SIGKILL at a chosen point, as `kill -9` would).

Run as a script it is that child: `python register_fixtures.py ROOT TRAIN EVAL [KILL] [--wait A B]`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneline.recipe import Recipe, validate_recipe
from tuneline.records import make_record
from tuneline.store import StageRef, find_stage, write_stage

MODEL_NAME = "tiny-chat"
QUESTIONS = [
    "How do I reset my password?",
    "Where is my refund?",
    "Can I change my plan?",
    "Is the app down?",
]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]
TRAIN_STATS = {
    "method": "lora",
    "steps": 3,
    "train_loss": 2.5,
    "seconds": 1.5,
    "log_history": [{"step": s, "loss": 3.0 - s / 2, "learning_rate": 1e-3} for s in (1, 2, 3)],
}
# Where a child kills itself with SIGKILL: right after MLflow created the version (before its
# "Created version" line and anything after it), or right after it moved the champion alias.
KILL_POINTS = ("version", "champion")


def make_recipe(root: Path) -> Recipe:
    return validate_recipe(
        {
            "name": "registry-test",
            "artifacts_dir": str(root / "store"),
            "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
            "model": {"name": "base", "chat_template": "{{ x }}" * 1200},  # a param longer than MLflow allows
            "evaluate": {"max_new_tokens": 6, "batch_size": 2},
            "register": {
                "model_name": MODEL_NAME,
                "tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                "margin": 0.05,
            },
        }
    )


def fake_stage(
    artifacts_dir: Path, stage: str, digest: str, stats: dict, files: dict[str, list] | None = None
) -> StageRef:
    """A finished stage with these stats and JSONL files (no records through its ledger)."""
    with write_stage(artifacts_dir, stage, digest) as writer:
        for name, rows in (files or {}).items():
            writer.path(name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        writer.stats = stats
        if stage == "train":
            shutil.copytree(artifacts_dir / "tiny-model", writer.path("model"))
    return find_stage(artifacts_dir, stage, digest)


def evaluated_stats(tuned_exact_match: float) -> dict:
    return {
        "examples": 4,
        "metric": "exact_match",
        "base": {"loss": 6.1, "perplexity": 445.9, "exact_match": 0.0},
        "tuned": {"loss": 1.2, "perplexity": 3.3, "exact_match": tuned_exact_match},
    }


def make_store(root: Path) -> tuple[Recipe, Path, StageRef]:
    """The recipe, its artifacts folder with the tiny model, and a split stage."""
    from tuneline.models import make_tiny_model

    recipe = make_recipe(root)
    store = Path(recipe.artifacts_dir)
    store.mkdir()
    make_tiny_model(
        store / "tiny-model", QUESTIONS * 5, vocab_size=320, hidden_size=32, num_layers=2, num_heads=4
    )
    records = [make_record([*c, {"role": "assistant", "content": "ok"}]) for c in CONVERSATIONS]
    splits = fake_stage(
        store,
        "split",
        "s1",
        {"counts": {"train": 2, "validation": 1, "test": 1}},
        {"train.jsonl": records[:2], "validation.jsonl": records[2:3], "test.jsonl": records[3:]},
    )
    return recipe, store, splits


def trained_and_evaluated(store: Path, name: str, score: float) -> tuple[StageRef, StageRef]:
    """A finished train stage (the tiny model) and its evaluation with `tuned_exact_match = score`."""
    return fake_stage(store, "train", f"t-{name}", TRAIN_STATS), fake_stage(
        store, "evaluate", f"e-{name}", evaluated_stats(score)
    )


def registered_store(root: Path) -> dict:
    """A store under `root` with the tiny model registered as version 1 (@champion) from train
    stage t-first: its root, store folder and tracking URI."""
    from tuneline.register.stage import run_register

    recipe, store, splits = make_store(root)
    run_register(store, recipe, splits, *trained_and_evaluated(store, "first", 0.5))
    return {"root": root, "store": store, "tracking_uri": recipe.register.tracking_uri}


def start_child(
    root: Path, name: str, kill: str | None = None, wait_for: list[Path] = ()
) -> subprocess.Popen:
    """A process that registers stage pair `name` of `root` (made by `trained_and_evaluated`)."""
    args = [sys.executable, __file__, str(root), name, kill or "-", *map(str, wait_for)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after(owner: object, method: str, when: callable) -> None:
    """Wrap `owner.method` so that the process dies by SIGKILL right after a call that `when` accepts."""
    original = getattr(owner, method)

    def wrapper(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, method, wrapper)


def child_main(root: Path, name: str, kill: str, wait_for: list[Path]) -> None:
    import mlflow

    from tuneline.register.stage import run_register
    from tuneline.store import read_stats

    if kill == "version":  # what both mlflow.register_model and log_model(registered_model_name=) call
        kill_after(mlflow.MlflowClient, "_create_model_version", lambda *a, **k: True)
    elif kill == "champion":
        kill_after(
            mlflow.MlflowClient, "set_registered_model_alias", lambda self, n, alias, v: alias == "champion"
        )
    recipe, store = make_recipe(root), root / "store"
    splits = find_stage(store, "split", "s1")
    trained, evaluated = find_stage(store, "train", f"t-{name}"), find_stage(store, "evaluate", f"e-{name}")
    (root / f"ready-{name}").touch()
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)  # start together: both children have imported everything by now
    ref = run_register(store, recipe, splits, trained, evaluated)
    print(json.dumps(read_stats(ref)))


if __name__ == "__main__":
    child_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], [Path(p) for p in sys.argv[4:]])
