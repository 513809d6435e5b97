"""The review checkpoint's core: decisions on a round's candidates, stored so none is ever lost.

A round's candidates form a *batch*, named by the digest of their ids and messages. Every
decision (accept, reject with a reason, or edit) is kept under
`<artifacts_dir>/review/<batch>/`: `journal.jsonl` takes each decision the moment it is made
(append-only, synced), and `decisions.json`, written atomically once every candidate has one, is
the batch's final result. A re-run that meets a finished batch never asks again. While a batch
waits, `review/pending/<batch>.json` tells reviewers which run and round it belongs to and where
its candidates lie (the round's stage, so a killed run loses none).

The Prefect form, the terminal and the export file all end here, as the same `Decision` rows.
No Prefect import: the flow and the CLI pass what they received. The loop that asks a round's
reviewers until its batch is decided is tuneline.augment.checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tuneline.errors import UserError
from tuneline.recipe import AutoPolicy

AUTO_REVIEWER = "auto-policy"
DecisionKind = Literal["accept", "reject", "edit"]


class ReviewError(UserError):
    """A review that cannot be used: a bad decision file, an unknown batch or candidate."""


class ReviewTimeout(UserError):
    """Nobody decided a batch in time; its candidates and decisions so far are kept."""


class Decision(BaseModel):
    """One reviewer's decision on one candidate; `messages` holds the edited conversation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    decision: DecisionKind
    reason: str | None = None
    messages: list[dict[str, Any]] | None = None
    reviewer: str
    at: str

    @model_validator(mode="after")
    def _complete(self) -> Decision:
        if self.decision == "reject" and not (self.reason or "").strip():
            raise ValueError("a reject needs a reason (it is fed back to the teacher as a common mistake)")
        if self.decision == "edit" and not self.messages:
            raise ValueError("an edit needs the edited answer")
        return self


class PendingBatch(BaseModel):
    """What waits for review: written when a run pauses, removed when the batch is finished."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: str
    run_id: str
    run_name: str
    round: int
    candidates_path: str
    count: int
    how: str
    created_at: str
    api_url: str | None = None  # the Prefect API of the paused run (a local server's port is random)


def review_command_line(verb: str, *args: str) -> str:
    """A `tuneline review` command as users type it (`decide RUN`, `export RUN --to FILE`, ...):
    the one place the CLI's words are spelled for messages."""
    return " ".join(("tuneline review", verb, *args))


def now() -> str:
    """The time stamp stored with decisions (UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def batch_digest(candidates: Iterable[dict[str, Any]]) -> str:
    """Digest of a round's candidates (ids and messages): the key decisions are stored under."""
    payload = json.dumps([[c["id"], c["messages"]] for c in candidates], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def answer_of(candidate: dict[str, Any]) -> str:
    """The last assistant turn: what a reviewer mostly judges and edits."""
    for message in reversed(candidate["messages"]):
        if message["role"] == "assistant":
            return message["content"]
    return ""


def reasoning_of(candidate: dict[str, Any]) -> str:
    """The last assistant turn's reasoning_content (cot mode), shown beside the answer; "" if none."""
    for message in reversed(candidate["messages"]):
        if message["role"] == "assistant":
            return message.get("reasoning_content", "")
    return ""


def prompt_of(candidate: dict[str, Any]) -> str:
    """The user turns before the answer, joined: the question the candidate answers."""
    return "\n".join(m["content"] for m in candidate["messages"] if m["role"] == "user")


def with_answer(candidate: dict[str, Any], answer: str) -> list[dict[str, Any]]:
    """The candidate's messages with the last assistant turn replaced by an edited answer."""
    messages = [dict(m) for m in candidate["messages"]]
    for message in reversed(messages):
        if message["role"] == "assistant":
            message["content"] = answer
            return messages
    return [*messages, {"role": "assistant", "content": answer}]


def make_decision(
    candidate: dict[str, Any],
    decision: DecisionKind,
    reviewer: str,
    reason: str | None = None,
    answer: str | None = None,
) -> Decision:
    """A decision on `candidate`, stamped now; an edit carries the candidate with its new answer."""
    messages = with_answer(candidate, answer) if decision == "edit" and answer is not None else None
    return Decision(
        id=candidate["id"],
        decision=decision,
        reason=((reason or "").strip() or None) if decision != "accept" else None,
        messages=messages,
        reviewer=reviewer,
        at=now(),
    )


def batch_dir(artifacts_dir: str | Path, batch: str) -> Path:
    return Path(artifacts_dir) / "review" / batch


def pending_path(artifacts_dir: str | Path, batch: str) -> Path:
    return Path(artifacts_dir) / "review" / "pending" / f"{batch}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def append_synced(journal: Path, line: str) -> None:
    """Append one line to a journal and sync it: a kill a moment later keeps it. A line an earlier
    kill cut short stays a line of its own (readers skip it)."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    cut = journal.is_file() and journal.stat().st_size > 0 and not journal.read_bytes().endswith(b"\n")
    with open(journal, "a", encoding="utf-8") as handle:
        handle.write(("\n" if cut else "") + line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def record_decision(artifacts_dir: str | Path, batch: str, decision: Decision) -> None:
    """Append one decision to the batch's journal and sync it: a kill a moment later keeps it."""
    append_synced(batch_dir(artifacts_dir, batch) / "journal.jsonl", decision.model_dump_json())


def read_decisions(artifacts_dir: str | Path, batch: str) -> dict[str, Decision]:
    """Decisions made on a batch so far, by candidate id (the latest one wins)."""
    return read_journaled(batch_dir(artifacts_dir, batch), "decisions.json", "decisions", Decision)


def read_journaled(folder: Path, final_name: str, key: str, model: type[BaseModel]) -> dict[str, Any]:
    """What a batch folder holds, by id: the final file's rows (`final_name`, under `key`) once
    written, else every whole line of its journal (the latest one per id wins). A line cut short
    by a kill mid-write was never given, and is skipped. Data review and comparisons share it."""
    final = folder / final_name
    if final.is_file():
        rows = json.loads(final.read_text(encoding="utf-8"))[key]
        return {row["id"]: model.model_validate(row) for row in rows}
    found: dict[str, Any] = {}
    journal = folder / "journal.jsonl"
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = model.model_validate_json(line)
            except ValidationError:
                continue
            found[entry.id] = entry
    return found


def finished_decisions(artifacts_dir: str | Path, batch: str) -> list[dict[str, Any]] | None:
    """The finished batch's decisions as plain dicts (what apply_decisions takes), or None."""
    final = batch_dir(artifacts_dir, batch) / "decisions.json"
    if not final.is_file():
        return None
    return json.loads(final.read_text(encoding="utf-8"))["decisions"]


def undecided(candidates: list[dict[str, Any]], decisions: dict[str, Decision]) -> list[dict[str, Any]]:
    """Candidates still waiting for a decision, in their order."""
    return [c for c in candidates if c["id"] not in decisions]


def finish_batch(
    artifacts_dir: str | Path, batch: str, candidates: list[dict[str, Any]], decisions: Iterable[Decision]
) -> list[dict[str, Any]]:
    """Journal the decisions, and once every candidate has one write `decisions.json` and clear
    the pending file. Returns the final decisions, or raises ReviewError naming what is missing."""
    known = {c["id"] for c in candidates}
    stored = read_decisions(artifacts_dir, batch)
    for decision in decisions:
        if decision.id not in known:
            raise ReviewError(f"batch {batch}: no candidate {decision.id!r}; decisions name the batch's ids")
        if stored.get(decision.id) != decision:
            record_decision(artifacts_dir, batch, decision)
            stored[decision.id] = decision
    missing = undecided(candidates, stored)
    if missing:
        raise ReviewError(
            f"batch {batch}: {len(missing)} of {len(candidates)} candidates have no decision yet "
            f"(first: {missing[0]['id']}); decide them with `{review_command_line('decide')}` or "
            f"`{review_command_line('import', 'FILE')}`"
        )
    rows = [stored[c["id"]].model_dump(mode="json") for c in candidates]
    final = batch_dir(artifacts_dir, batch) / "decisions.json"
    if not final.is_file():
        write_atomic(final, json.dumps({"batch": batch, "decisions": rows}, indent=1, ensure_ascii=False))
    pending_path(artifacts_dir, batch).unlink(missing_ok=True)
    return rows


def open_batch(artifacts_dir: str | Path, pending: PendingBatch) -> None:
    """Announce a batch waiting for review (atomically, so a reader never sees half a file)."""
    write_atomic(pending_path(artifacts_dir, pending.batch), pending.model_dump_json(indent=1))


def list_pending(artifacts_dir: str | Path, run: str | None = None) -> list[PendingBatch]:
    """Batches waiting for review, oldest first; `run` keeps those whose run id or name starts so."""
    folder = Path(artifacts_dir) / "review" / "pending"
    batches = [PendingBatch.model_validate_json(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")]
    if run:
        batches = [b for b in batches if b.run_id.startswith(run) or b.run_name.startswith(run)]
    return sorted(batches, key=lambda b: (b.created_at, b.round))


def find_pending(artifacts_dir: str | Path, run_or_batch: str) -> PendingBatch:
    """The one pending batch of a run (id or name prefix) or with this batch digest."""
    matches = [b for b in list_pending(artifacts_dir) if b.batch == run_or_batch] or list_pending(
        artifacts_dir, run_or_batch
    )
    if not matches:
        raise ReviewError(
            f"nothing waits for review for {run_or_batch!r} in {artifacts_dir}; "
            f"`{review_command_line('list')}` shows what waits"
        )
    return matches[0]


def read_candidates(pending: PendingBatch) -> list[dict[str, Any]]:
    """The batch's candidates, from the round's stage."""
    path = Path(pending.candidates_path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def auto_decide(policy: AutoPolicy, candidates: list[dict[str, Any]]) -> list[Decision]:
    """The explicit auto policy: the first matching rule rejects with its reason, else `default`."""
    rules = [(re.compile(rule.pattern), rule.reason) for rule in policy.reject_if]
    decisions = []
    for candidate in candidates:
        text = "\n".join(m["content"] + "\n" + m.get("reasoning_content", "") for m in candidate["messages"])
        reason = next((why for pattern, why in rules if pattern.search(text)), None)
        if reason is None and policy.default == "reject":
            reason = "rejected by the auto policy's default"
        kind: DecisionKind = "reject" if reason else "accept"
        decisions.append(make_decision(candidate, kind, AUTO_REVIEWER, reason=reason))
    return decisions


def to_form_input(
    candidates: list[dict[str, Any]], decisions: dict[str, Decision], reviewer: str
) -> dict[str, Any]:
    """The review form's data (one row per candidate), pre-filled from decisions made so far.

    The same dict pre-fills the Prefect UI form and is sent as `run_input` to resume a run.
    """
    rows = []
    for candidate in candidates:
        made = decisions.get(candidate["id"])
        edited = made.messages if made and made.messages else None
        rows.append(
            {
                "id": candidate["id"],
                "question": prompt_of(candidate),
                "answer": answer_of({"messages": edited}) if edited else answer_of(candidate),
                "decision": made.decision if made else "accept",
                "reason": (made.reason if made else None) or "",
            }
        )
    return {"reviewer": reviewer, "rows": rows}


def from_form_input(
    candidates: list[dict[str, Any]], form: dict[str, Any]
) -> tuple[list[Decision], list[str]]:
    """Decisions from a submitted form, and one problem line per row that cannot be used."""
    by_id = {c["id"]: c for c in candidates}
    reviewer = (form.get("reviewer") or "").strip() or "reviewer"
    decisions, problems = [], []
    for number, row in enumerate(form.get("rows", []), start=1):
        candidate = by_id.get(row.get("id"))
        if candidate is None:
            problems.append(f"row {number}: unknown candidate id {row.get('id')!r}")
            continue
        answer = row.get("answer")
        kind = row.get("decision")
        if kind == "accept" and answer is not None and answer != answer_of(candidate):
            kind = "edit"  # the answer was changed: keep the change rather than lose it
        try:
            decisions.append(
                make_decision(candidate, kind, reviewer, reason=row.get("reason"), answer=answer)
            )
        except ValidationError as error:
            problems.append(f"row {number} ({candidate['id']}): {_first_message(error)}")
    return decisions, problems


def _first_message(error: ValidationError) -> str:
    return error.errors()[0]["msg"].removeprefix("Value error, ")


EXPORT_COLUMNS = ["batch", "id", "question", "reasoning", "answer", "decision", "reason", "edited_answer"]


def export_batch(artifacts_dir: str | Path, pending: PendingBatch, path: str | Path) -> int:
    """Write the batch to a .jsonl or .csv file a reviewer fills in (decision, reason,
    edited_answer); decisions already made are filled in. Returns the number of rows."""
    path = Path(path)
    candidates = read_candidates(pending)
    made = read_decisions(artifacts_dir, pending.batch)
    rows = []
    for candidate in candidates:
        decision = made.get(candidate["id"])
        edited = answer_of({"messages": decision.messages}) if decision and decision.messages else ""
        rows.append(
            {
                "batch": pending.batch,
                "id": candidate["id"],
                "question": prompt_of(candidate),
                "reasoning": reasoning_of(candidate),  # cot mode; edits change the answer only
                "answer": answer_of(candidate),
                "decision": decision.decision if decision else "",
                "reason": (decision.reason if decision else None) or "",
                "edited_answer": edited,
            }
        )
    if path.suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        raise ReviewError(f"--to {path}: export to a .jsonl or .csv file")
    return len(rows)


def read_review_file(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of an exported-and-edited review file with their line numbers."""
    return read_row_file(Path(path), ReviewError, review_command_line("export"))


def read_row_file(
    path: Path, error: type[UserError], export_command: str
) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a filled-in .csv or .jsonl export with their line numbers; a file that cannot be
    read raises `error` naming it (and the line), and what wrote it (`export_command`)."""
    try:
        if path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as handle:
                return list(enumerate(csv.DictReader(handle), start=2))
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line.strip()]
    except OSError as problem:
        raise error(f"{path}: cannot read: {problem.strerror}") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path}:{problem.lineno}: not a JSON line: {problem.msg}") from None
    raise error(f"{path}: import a .jsonl or .csv file written by `{export_command}`")


def import_decisions(
    artifacts_dir: str | Path, path: str | Path, reviewer: str
) -> tuple[PendingBatch, list[dict[str, Any]] | None]:
    """Store the decisions of a filled-in review file. Returns the batch and its final decisions
    (None while some rows are still blank). Bad rows raise ReviewError naming file:line."""
    rows = read_review_file(path)
    batches = {row.get("batch") for _, row in rows}
    if len(batches) != 1:
        raise ReviewError(f"{path}: rows of {len(batches)} batches; import one exported file at a time")
    batch = batches.pop()
    pending = find_pending(artifacts_dir, batch)
    candidates = {c["id"]: c for c in read_candidates(pending)}
    made = read_decisions(artifacts_dir, batch)
    for number, row in rows:
        kind = (row.get("decision") or "").strip().lower()
        if not kind:
            continue
        candidate = candidates.get(row.get("id"))
        if candidate is None:
            raise ReviewError(f"{path}:{number}: id {row.get('id')!r} is not a candidate of batch {batch}")
        if kind not in ("accept", "reject", "edit"):
            raise ReviewError(f"{path}:{number}: decision {kind!r}: write accept, reject or edit")
        edited = row.get("edited_answer") or None
        if kind == "edit" and edited is None:
            raise ReviewError(f"{path}:{number}: decision edit needs the new answer in edited_answer")
        try:
            decision = make_decision(candidate, kind, reviewer, reason=row.get("reason"), answer=edited)
        except ValidationError as error:
            raise ReviewError(f"{path}:{number}: {_first_message(error)}") from None
        before = made.get(decision.id)
        if before and (before.decision, before.reason, before.messages) == (
            decision.decision,
            decision.reason,
            decision.messages,
        ):
            continue  # exported as it was decided: keep who decided it and when
        record_decision(artifacts_dir, batch, decision)
    ordered = list(candidates.values())
    if undecided(ordered, read_decisions(artifacts_dir, batch)):
        return pending, None
    return pending, finish_batch(artifacts_dir, batch, ordered, [])
