"""Blind comparisons through a file: export a waiting batch's unanswered pairs to a .csv or .jsonl
file, a person fills in `winner` (A, B or tie), import stores the answers. A file with one bad row
stores nothing and names file:line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tuneline.augment.review import read_row_file
from tuneline.evaluate.compare import (
    PICKS,
    Answer,
    CompareError,
    PendingComparison,
    compare_command_line,
    find_pending,
    finish_batch,
    now,
    read_answers,
    read_items,
    record_answer,
    to_form_input,
    undecided,
)

EXPORT_COLUMNS = ["batch", "id", "prompt", "reply_a", "reply_b", "winner"]


def export_batch(artifacts_dir: str | Path, pending: PendingComparison, path: str | Path) -> int:
    """Write the batch's unanswered items to a .csv or .jsonl file to fill in (winner: A, B or
    tie). Returns the number of rows."""
    path = Path(path)
    items = read_items(artifacts_dir, pending.batch)
    form = to_form_input(items, read_answers(artifacts_dir, pending.batch), "")
    rows = [{"batch": pending.batch, **row, "winner": ""} for row in form["rows"]]
    if path.suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        raise CompareError(f"--to {path}: export to a .csv or .jsonl file")
    return len(rows)


def read_answer_file(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a filled-in export file with their line numbers."""
    return read_row_file(path, CompareError, compare_command_line("export"))


def import_answers(
    artifacts_dir: str | Path, path: str | Path, rater: str
) -> tuple[PendingComparison, list[dict[str, Any]] | None]:
    """Store the answers of a filled-in file. Returns the batch and its final answers (None while
    some items are still unanswered). A bad row raises CompareError naming file:line."""
    path = Path(path)
    rows = read_answer_file(path)
    batches = {row.get("batch") for _, row in rows}
    if len(batches) != 1:
        raise CompareError(f"{path}: rows of {len(batches)} batches; import one exported file at a time")
    pending = find_pending(artifacts_dir, batches.pop())
    known = {item["id"] for item in read_items(artifacts_dir, pending.batch)}
    picks = {pick.casefold(): pick for pick in PICKS}
    answers = []
    for number, row in rows:
        given = (row.get("winner") or "").strip()
        if not given:
            continue
        if row.get("id") not in known:
            raise CompareError(
                f"{path}:{number}: id {row.get('id')!r} is not a comparison of batch {pending.batch}"
            )
        if given.casefold() not in picks:
            raise CompareError(f"{path}:{number}: winner {given!r}: write A, B or tie")
        answers.append(Answer(id=row["id"], winner=picks[given.casefold()], rater=rater, at=now()))
    for answer in answers:  # only once every row is good: a file with a typo stores nothing
        record_answer(artifacts_dir, pending.batch, answer)
    if undecided(read_items(artifacts_dir, pending.batch), read_answers(artifacts_dir, pending.batch)):
        return pending, None
    return pending, finish_batch(artifacts_dir, pending.batch, pending.model_name)
