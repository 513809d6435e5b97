"""Augmentation rounds: the teacher writes candidates, checks and reviewers sift them, mistakes feed back.

One round is a stage of its own (`augment_round`): the prompts sent (`prompt.json`, stored and
visible), the candidates that passed the automatic checks (`candidates.jsonl`, canonical records
whose meta says origin, round, teacher model and prompt digest, and the document URL when
grounded), every rejected item with its reason in `rejects.jsonl`, token counts in `stats.json`.
The round's digest covers the requests themselves, so a re-run with the same history, recipe and
recordings reuses the round instead of asking again, and the review (keyed by the round's batch)
is never asked twice.

Between rounds the flow (flows/augment.py) collects the reviewers' decisions. `apply_decisions`
turns them into accepted or edited records with provenance, `summarize_mistakes` words the reject
reasons and edits of all rounds so far as the next prompt's "common mistakes", and
`next_round_or_stop` says when to stop. `run_augment_merge` then writes the `augment` stage that
clean reads: collected records plus accepted ones, every rejected candidate kept with its reason.

A decision is a plain dict: {"id", "decision": accept|reject|edit, "reason", "messages" (edited
conversation), "reviewer", "at"}; for one id the last decision counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tuneline.augment.checks import (
    AugmentError,
    CandidateChecks,
    TeacherBatch,
    candidate_record,
    document_chunks,
    load_seeds,
    mistake_wording,
    plan_round,
    shared_system,
)
from tuneline.augment.cot import cot_candidate, plan_cot_round
from tuneline.augment.teacher import ask_teacher, parse_json_reply
from tuneline.pipeline import AUGMENT, AUGMENT_ROUND
from tuneline.recipe import AugmentSpec
from tuneline.records import Record, RecordError, make_record
from tuneline.store import (
    REJECTS,
    StageRef,
    StageWriter,
    iter_records,
    read_manifest,
    read_stats,
    reuse_or_write,
    stage_key,
)

__all__ = [
    "AugmentError", "ReviewedRound", "apply_decisions", "next_round_or_stop", "read_candidates",
    "round_summary", "run_augment_merge", "run_generate_round", "summarize_mistakes",
]  # fmt: skip

CANDIDATES = "candidates.jsonl"
PROMPT = "prompt.json"
REVIEW_REJECT = "rejected_in_review"
NOT_REVIEWED = "not_reviewed"
REPLACED = "replaced_by_reasoning"
EDITS_SHOWN = 5
SHOWN_CHARS = 160


class ReviewedRound(BaseModel):
    """A finished round: its `augment_round` stage and the reviewers' decisions on its candidates."""

    model_config = ConfigDict(frozen=True)

    round_no: int
    generated: StageRef
    decisions: list[dict[str, Any]]


# ---------------------------------------------------------------- one round


def run_generate_round(
    artifacts_dir: str | Path,
    spec: AugmentSpec,
    source_ref: StageRef,
    round_no: int,
    history: list[ReviewedRound],
    api_key: str | None = None,
) -> StageRef:
    """Ask the teacher for one round of candidates, check them, and write the `augment_round` stage.

    `source_ref` is the collect stage (its records are the seeds when the recipe names no seed file,
    its documents the material in documents mode); `history` holds the rounds before this one with
    their decisions: their accepted records form the pool, their rejects the common mistakes.
    Raises TeacherError (replay miss, bad key) and TeacherUnreachable (retry the task).
    """
    seeds, unreadable = load_seeds(spec, source_ref)  # documents mode: the collected records
    if spec.mode != "documents" and not seeds:
        raise AugmentError(
            f"augment.mode {spec.mode}: no seed records; set augment.seeds.path or add a source"
        )
    chunks = document_chunks(source_ref, spec.chunk_chars) if spec.mode == "documents" else []
    mistakes = summarize_mistakes(history)
    pool = [record for reviewed in history for record in apply_round(reviewed)[0]]
    system = shared_system(spec, seeds if spec.mode == "seeds" else [])
    if spec.mode == "cot":
        answered = {r["meta"]["seed_id"] for r in pool if "seed_id" in r["meta"]}
        requests = plan_cot_round(spec, seeds, mistakes, round_no, answered)
    else:
        requests = plan_round(spec, seeds, chunks, mistakes, round_no)
    teacher = spec.teacher.model_dump(include={"model", "temperature", "max_tokens", "seed", "json_mode"})
    digest = stage_key(
        AUGMENT_ROUND, teacher, spec.checks, system, round_no, [r.messages for r in requests],
        _ids_digest(seeds), _ids_digest(pool), source_ref.digest,
    )  # fmt: skip

    def write(writer: StageWriter) -> None:
        replies = ask_teacher(spec.teacher, [r.messages for r in requests], api_key=api_key)
        # cot answers the seeds' own questions: only the pool (questions answered before) is a duplicate.
        checks = CandidateChecks(spec.checks, [] if spec.mode == "cot" else seeds, pool)
        for index, (request, reply) in enumerate(zip(requests, replies, strict=True)):
            where = {"round": round_no, "request": index, "request_digest": reply.request_digest}
            if reply.error is not None:
                writer.count_in()
                writer.drop(where, "teacher_error", reply.error)
                continue
            meta = {
                "source": "augment",
                "origin": "generated",
                "round": round_no,
                "teacher_model": spec.teacher.model,
                "prompt_digest": reply.request_digest[:16],
                **request.meta,
            }
            if spec.mode == "cot":
                writer.count_in()
                verdict = cot_candidate(reply, request, spec.checks, meta)
                if verdict.record is None:
                    raw = {**where, "reply": reply.text, "server_reasoning": reply.reasoning}
                    writer.drop(raw, verdict.reason, verdict.detail)
                elif failed := checks.check(verdict.record):
                    writer.drop(verdict.record, *failed)
                else:
                    writer.keep(verdict.record, CANDIDATES)
                continue
            batch, problem = parse_json_reply(reply.text, TeacherBatch)
            if batch is None or not batch.candidates:
                writer.count_in()
                writer.drop(
                    {**where, "reply": reply.text}, "parse_error", problem or "no candidates in the reply"
                )
                continue
            for raw in batch.candidates:
                writer.count_in()
                verdict = candidate_record(raw, system, meta)
                if verdict.record is None:
                    writer.drop({**where, "candidate": raw}, verdict.reason, verdict.detail)
                elif failed := checks.check(verdict.record):
                    writer.drop(verdict.record, *failed)
                else:
                    writer.keep(verdict.record, CANDIDATES)
        sent = [
            {"messages": r.messages, "n": r.n, "request_digest": reply.request_digest, **r.meta}
            for r, reply in zip(requests, replies, strict=True)
        ]
        prompt = {"round": round_no, "mistakes": mistakes, "system": system, "requests": sent}
        writer.path(PROMPT).write_text(json.dumps(prompt, indent=1, ensure_ascii=False), encoding="utf-8")
        writer.path(CANDIDATES).touch()  # present even when no candidate passed
        writer.stats = {
            "round": round_no,
            "mode": spec.mode,
            "teacher_model": spec.teacher.model,
            "seeds": len(seeds),
            "unreadable_seeds": unreadable,
            "requests": len(requests),
            "asked": spec.per_round,
            "from_recording": sum(r.recorded for r in replies),
            "prompt_tokens": sum(r.prompt_tokens for r in replies),
            "completion_tokens": sum(r.completion_tokens for r in replies),
            "passed": writer.records_out,
            "rejected": dict(sorted(writer.dropped.items())),
        }

    return reuse_or_write(artifacts_dir, AUGMENT_ROUND, digest, write, [source_ref])


def _ids_digest(records: list[Record]) -> str:
    return hashlib.sha256(" ".join(sorted(r["id"] for r in records)).encode()).hexdigest()[:16]


def read_candidates(round_ref: StageRef) -> list[Record]:
    """The candidates of a round that passed the automatic checks: what reviewers decide on."""
    return list(iter_records(round_ref, CANDIDATES))


# ---------------------------------------------------------------- decisions and feedback


def apply_decisions(
    candidates: list[Record], decisions: list[dict[str, Any]]
) -> tuple[list[Record], list[dict[str, Any]]]:
    """Accepted and edited records with their review in meta, and the rejected ones as reject rows
    ({"reason", "detail", "record"}); a candidate nobody decided on is rejected as `not_reviewed`."""
    by_id = {candidate["id"]: candidate for candidate in candidates}
    latest: dict[str, dict[str, Any]] = {}
    for decision in decisions:
        if decision["id"] not in by_id:
            raise AugmentError(f"a decision names candidate {decision['id']}, which is not in this round")
        latest[decision["id"]] = decision
    accepted, rejected = [], []
    for candidate in candidates:
        decision = latest.get(candidate["id"])
        if decision is None:
            rejected.append(
                {"reason": NOT_REVIEWED, "detail": "no decision was recorded", "record": candidate}
            )
            continue
        review = {key: decision.get(key) for key in ("decision", "reviewer", "at")}
        if decision.get("reason"):
            review["reason"] = decision["reason"]
        meta = {**candidate["meta"], "review": review}
        if decision["decision"] == "reject":
            row = {
                "reason": REVIEW_REJECT,
                "detail": decision.get("reason"),
                "record": {**candidate, "meta": meta},
            }
            rejected.append(row)
        elif decision["decision"] == "edit":
            try:
                edited = make_record(decision["messages"], candidate.get("tools"), meta)
            except RecordError as error:
                raise AugmentError(
                    f"the edit of candidate {candidate['id']} is not a usable conversation: {error}; "
                    "edit it again"
                ) from None
            edited["meta"].update(origin="edited", edited_from=candidate["id"])
            accepted.append(edited)
        else:
            accepted.append({**candidate, "meta": {**meta, "origin": "generated"}})
    return accepted, rejected


def apply_round(reviewed: ReviewedRound) -> tuple[list[Record], list[dict[str, Any]]]:
    """apply_decisions over a finished round's candidates."""
    return apply_decisions(read_candidates(reviewed.generated), reviewed.decisions)


def summarize_mistakes(history: list[ReviewedRound]) -> str:
    """The reject reasons of all rounds so far, counted and most frequent first (automatic checks
    worded for the teacher, reviewers' reasons as written), then what reviewers changed in their
    most recent edits as short before -> after lines. Empty when nothing went wrong yet."""
    counts: Counter[str] = Counter()
    wording: dict[str, str] = {}
    edits: list[str] = []
    for reviewed in history:
        for reject in iter_records(reviewed.generated, REJECTS):
            if text := mistake_wording(reject["reason"], reject["detail"]):
                counts[text] += 1
                wording.setdefault(text, text)
        candidates = {c["id"]: c for c in read_candidates(reviewed.generated)}
        _, rejected = apply_round(reviewed)
        for row in rejected:
            if row["reason"] == REVIEW_REJECT and row["detail"]:
                key = " ".join(row["detail"].lower().split()).rstrip(".")
                counts[key] += 1
                wording.setdefault(key, " ".join(row["detail"].split()).rstrip("."))
        latest = {decision["id"]: decision for decision in reviewed.decisions}  # the last one counts
        for decision in latest.values():
            if decision["decision"] == "edit" and decision["id"] in candidates:
                edits.append(_edit_line(candidates[decision["id"]]["messages"], decision["messages"]))
    lines = []
    if counts:
        lines.append("Reasons examples were rejected so far (most frequent first):")
        lines += [f"- {wording[key]} ({n}x)" for key, n in counts.most_common()]
    if edits := [line for line in edits if line][-EDITS_SHOWN:]:
        lines.append("Reviewers corrected these (before -> after):")
        lines += edits
    return "\n".join(lines)


def _edit_line(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """The first turn a reviewer changed, as `- role: "before" -> "after"` (shortened)."""
    for old, new in zip(before, after, strict=False):
        if old.get("content") != new.get("content"):
            return f"- {new.get('role')}: {_short(old.get('content'))} -> {_short(new.get('content'))}"
    return ""


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return json.dumps(
        text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "...", ensure_ascii=False
    )


def round_summary(reviewed: ReviewedRound) -> dict[str, Any]:
    """One round in numbers: generated, automatic rejects by reason, accepted, edited, rejected in
    review, acceptance rate (accepted and edited over generated, teacher errors not counted), tokens."""
    ledger = read_manifest(reviewed.generated)["ledger"]
    stats = read_stats(reviewed.generated)
    accepted, rejected = apply_round(reviewed)
    edited = sum(r["meta"]["origin"] == "edited" for r in accepted)
    generated = ledger["in"] - ledger["dropped"].get("teacher_error", 0)
    return {
        "round": reviewed.round_no,
        "generated": generated,
        "auto_rejected": ledger["dropped"],
        "reviewed": ledger["out"],
        "accepted": len(accepted) - edited,
        "edited": edited,
        "rejected_in_review": len(rejected),
        "acceptance_rate": len(accepted) / generated if generated else 0.0,
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
    }


def next_round_or_stop(history: list[ReviewedRound], spec: AugmentSpec) -> str | None:
    """Why to stop after the rounds so far (target reached, every question answered in cot mode,
    acceptance below the floor, round limit), or None to go on with another round."""
    if not history:
        return None
    summaries = [round_summary(reviewed) for reviewed in history]
    total = sum(s["accepted"] + s["edited"] for s in summaries)
    if total >= spec.target_accepted:
        return f"target reached: {total} accepted (augment.target_accepted {spec.target_accepted})"
    if spec.mode == "cot" and read_stats(history[-1].generated)["requests"] == 0:
        return f"every seed question has an accepted answer ({total} accepted)"
    last = summaries[-1]
    if last["acceptance_rate"] < spec.min_acceptance_rate:
        return (
            f"acceptance below the floor: round {last['round']} accepted {last['accepted'] + last['edited']} "
            f"of {last['generated']} ({last['acceptance_rate']:.0%} < augment.min_acceptance_rate "
            f"{spec.min_acceptance_rate:.0%})"
        )
    if len(history) >= spec.max_rounds:
        return f"round limit reached: {len(history)} round(s) (augment.max_rounds {spec.max_rounds})"
    return None


# ---------------------------------------------------------------- the augment stage


def run_augment_merge(
    artifacts_dir: str | Path, collected_ref: StageRef, rounds: list[ReviewedRound]
) -> StageRef:
    """The `augment` stage clean reads: the collected records plus every accepted or edited one.

    Its ledger takes in the collected records and every item the teacher produced; each rejected
    one (automatic check or review) is in rejects.jsonl with its reason. A collected record that
    cot mode answered with reasoning (an accepted record's `meta.seed_id`) is replaced by that
    record (`replaced_by_reasoning`): the two share question and answer, so clean would otherwise
    keep only the first as a near duplicate, and training would see both targets. stats.json says
    how many came from collect (`collected`), were replaced, came from the teacher (`generated`)
    and were accepted, and each round's summary.
    """
    decided = [(r.round_no, r.generated.digest, r.decisions) for r in rounds]
    digest = stage_key(AUGMENT, collected_ref.digest, decided)

    def write(writer: StageWriter) -> None:
        applied = [(reviewed, *apply_round(reviewed)) for reviewed in rounds]
        replaced = {
            r["meta"]["seed_id"]: r["id"] for _, kept, _ in applied for r in kept if "seed_id" in r["meta"]
        }
        for record in iter_records(collected_ref):
            writer.count_in()
            if record["id"] in replaced:
                detail = f"answered step by step by the teacher as record {replaced[record['id']]}"
                writer.drop(record, REPLACED, detail)
            else:
                writer.keep(record)
        collected = writer.records_in
        for reviewed, accepted, rejected in applied:
            for reject in iter_records(reviewed.generated, REJECTS):
                writer.count_in()
                writer.drop(reject["record"], reject["reason"], reject["detail"])
            for record in accepted:
                writer.count_in()
                writer.keep(record)
            for row in rejected:
                writer.count_in()
                writer.drop(row["record"], row["reason"], row["detail"])
        writer.stats = {
            "collected": collected,
            "replaced_by_reasoning": writer.dropped.get(REPLACED, 0),
            "generated": writer.records_in - collected,
            "accepted": sum(len(accepted) for _, accepted, _ in applied),
            "rounds": [round_summary(reviewed) for reviewed in rounds],
        }

    inputs = [collected_ref, *(r.generated for r in rounds)]
    return reuse_or_write(artifacts_dir, AUGMENT, digest, write, inputs)
