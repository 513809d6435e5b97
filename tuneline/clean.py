"""The clean stage: normalize text, then drop what cannot train well, each drop with its reason.

Every filter is a small function `record -> reason | None`; the stage counts drops by reason
in the ledger and quarantines the record in rejects.jsonl.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path

from tuneline.recipe import CleanSpec
from tuneline.records import Record, content_digest, record_text
from tuneline.store import RECORDS, StageRef, code_digest, find_stage, iter_records, stage_digest, write_stage

Filter = Callable[[Record], str | None]


def normalize_record(record: Record) -> Record:
    """NFC-normalize and trim every turn, unify newlines; the id follows the new content."""
    messages = [
        {**message, "content": unicodedata.normalize("NFC", message["content"]).replace("\r\n", "\n").strip()}
        for message in record["messages"]
    ]
    return {**record, "messages": messages, "id": content_digest(messages, record.get("tools"))}


def empty_turn(record: Record) -> str | None:
    """A user or assistant turn with no text teaches nothing (tool-call turns may be empty)."""
    for message in record["messages"]:
        if message["role"] in ("user", "assistant") and not message["content"].strip():
            if message.get("tool_calls"):
                continue
            return "empty_turn"
    return None


def length_bounds(spec: CleanSpec) -> Filter:
    """Conversations shorter than min_chars or longer than max_chars, in characters."""

    def check(record: Record) -> str | None:
        size = len(record_text(record))
        if size < spec.min_chars:
            return "too_short"
        if size > spec.max_chars:
            return "too_long"
        return None

    return check


def run_clean(artifacts_dir: str | Path, collected: StageRef, spec: CleanSpec) -> StageRef:
    """Normalize, filter and exact-dedup the collected records into a new stage."""
    digest = stage_digest("clean", spec, collected.digest, code_digest(__file__))
    if cached := find_stage(artifacts_dir, "clean", digest):
        return cached
    filters: list[Filter] = [empty_turn, length_bounds(spec)]
    seen: set[str] = set()
    with write_stage(artifacts_dir, "clean", digest, [collected]) as writer:
        for record in iter_records(collected, RECORDS):
            writer.count_in()
            if spec.normalize_text:
                record = normalize_record(record)
            reason = next((r for f in filters if (r := f(record))), None)
            if reason is None and spec.dedup:
                reason = "duplicate" if record["id"] in seen else None
                seen.add(record["id"])
            if reason:
                writer.drop(record, reason)
            else:
                writer.keep(record)
        writer.stats = {"kept": writer.records_out, "dropped": dict(writer.dropped)}
    return find_stage(artifacts_dir, "clean", digest)
