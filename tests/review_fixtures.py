"""A round's candidates waiting for review, as both review test files set them up."""

from __future__ import annotations

import json
from pathlib import Path

from tuneline.augment.review import PendingBatch, batch_digest, open_batch


def open_pending_batch(
    tmp_path: Path, candidates: list[dict], *, run_id: str, run_name: str, how: str
) -> tuple[Path, PendingBatch]:
    """The candidates in a round's file, announced as a pending batch under `tmp_path/artifacts`."""
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in candidates), encoding="utf-8")
    pending = PendingBatch(
        batch=batch_digest(candidates),
        run_id=run_id,
        run_name=run_name,
        round=1,
        candidates_path=str(path),
        count=len(candidates),
        how=how,
        created_at="2026-01-01T00:00:00+00:00",
    )
    artifacts = tmp_path / "artifacts"
    open_batch(artifacts, pending)
    return artifacts, pending
