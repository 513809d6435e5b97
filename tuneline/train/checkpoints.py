"""Checkpoints with an object store as artifacts_dir: written to local disk, uploaded when due.

The trainer saves every `train.save_steps` into the local checkpoint folder as always; the main
process then uploads that `checkpoint-N` to the same path under the store (its trainer state last:
a checkpoint without it is partial). A training started on a machine whose local folder has no
checkpoint (another machine, or a fresh disk) downloads the newest complete one and resumes
from it. Without an object store both do nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tuneline.objectstore import bound_store, upload_checkpoint


class UploadCheckpoints(TrainerCallback):
    """After each checkpoint the trainer saved, upload it (main process only)."""

    def __init__(self, artifacts_dir: str | Path) -> None:
        self.artifacts_dir = artifacts_dir

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            upload_checkpoint(self.artifacts_dir, checkpoint)


def checkpoint_callbacks(artifacts_dir: str | Path) -> list[TrainerCallback]:
    """The callbacks a training needs for the store its artifacts folder is bound to (none for a
    local folder)."""
    return [UploadCheckpoints(artifacts_dir)] if bound_store(artifacts_dir) else []
