"""The split stage: deterministic train/validation/test by hashing each record's id with a seed.

A record's split depends only on its content and the seed, never on file order or on which
other records exist, so adding data does not move old test records into training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneline.recipe import SplitSpec
from tuneline.store import RECORDS, StageRef, code_digest, find_stage, iter_records, stage_digest, write_stage

SPLITS = ("train", "validation", "test")


def assign_split(record_id: str, spec: SplitSpec) -> str:
    """Which split a record belongs to: a stable position in [0, 1) from its id and the seed."""
    position = int(hashlib.sha256(f"{spec.seed}:{record_id}".encode()).hexdigest()[:12], 16) / 16**12
    if position < spec.test:
        return "test"
    if position < spec.test + spec.validation:
        return "validation"
    return "train"


def run_split(artifacts_dir: str | Path, gated: StageRef, spec: SplitSpec) -> StageRef:
    """Deal the gated records into train.jsonl, validation.jsonl and test.jsonl."""
    digest = stage_digest("split", spec, gated.digest, code_digest(__file__))
    if cached := find_stage(artifacts_dir, "split", digest):
        return cached
    with write_stage(artifacts_dir, "split", digest, [gated]) as writer:
        counts = dict.fromkeys(SPLITS, 0)
        for record in iter_records(gated, RECORDS):
            writer.count_in()
            name = assign_split(record["id"], spec)
            writer.keep(record, f"{name}.jsonl")
            counts[name] += 1
        for name in SPLITS:  # an empty split is still a file, so readers need no special case
            writer.path(f"{name}.jsonl").touch()
        writer.stats = {"counts": counts}
    return find_stage(artifacts_dir, "split", digest)
