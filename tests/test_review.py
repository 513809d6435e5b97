"""Review decisions: the store (journal, finished batch, pending file), the auto policy, the form
data and the export/import round trip that a reviewer without the UI uses."""

from __future__ import annotations

import csv
import json

import pytest
from review_fixtures import open_pending_batch

from tuneline.augment.review import (
    AUTO_REVIEWER,
    ReviewError,
    auto_decide,
    batch_digest,
    export_batch,
    finish_batch,
    finished_decisions,
    from_form_input,
    import_decisions,
    list_pending,
    make_decision,
    read_decisions,
    record_decision,
    to_form_input,
)
from tuneline.recipe import AutoPolicy, ReviewSpec


def candidate(number: int, answer: str = "") -> dict:
    return {
        "id": f"c{number}",
        "messages": [
            {"role": "user", "content": f"Question {number}?"},
            {"role": "assistant", "content": answer or f"Answer {number}."},
        ],
        "meta": {"origin": "generated", "round": 1},
    }


@pytest.fixture
def batch(tmp_path):
    """Three candidates in a round stage file, announced as a pending batch."""
    candidates = [candidate(1), candidate(2, "As an AI, I cannot."), candidate(3)]
    artifacts, pending = open_pending_batch(
        tmp_path, candidates, run_id="0b5e-run", run_name="brave-otter", how="file"
    )
    return artifacts, pending, candidates


def test_batch_digest_follows_content():
    assert batch_digest([candidate(1)]) == batch_digest([candidate(1)])
    assert batch_digest([candidate(1)]) != batch_digest([candidate(1, "Another answer.")])


def test_decision_rules_name_what_is_missing():
    with pytest.raises(ValueError, match="reject needs a reason"):
        make_decision(candidate(1), "reject", "ann", reason="  ")
    with pytest.raises(ValueError, match="edit needs the edited answer"):
        make_decision(candidate(1), "edit", "ann")
    edited = make_decision(candidate(1), "edit", "ann", answer="Better answer.")
    assert edited.messages[-1] == {"role": "assistant", "content": "Better answer."}
    assert edited.messages[0]["content"] == "Question 1?"


def test_journal_keeps_each_decision_and_a_finished_batch_is_final(batch):
    artifacts, pending, candidates = batch
    record_decision(artifacts, pending.batch, make_decision(candidates[0], "accept", "ann"))
    # a kill mid-write leaves a cut line: the decisions before it survive
    with open(artifacts / "review" / pending.batch / "journal.jsonl", "a") as handle:
        handle.write('{"id": "c2", "decis')
    assert set(read_decisions(artifacts, pending.batch)) == {"c1"}
    assert finished_decisions(artifacts, pending.batch) is None

    with pytest.raises(ReviewError, match="1 of 3 candidates have no decision yet"):
        finish_batch(artifacts, pending.batch, candidates, [make_decision(candidates[1], "accept", "ann")])
    rows = finish_batch(
        artifacts, pending.batch, candidates, [make_decision(candidates[2], "reject", "ann", reason="vague")]
    )
    assert [r["decision"] for r in rows] == ["accept", "accept", "reject"]
    assert finished_decisions(artifacts, pending.batch) == rows
    assert list_pending(artifacts) == []


def test_unknown_candidate_is_refused(batch):
    artifacts, pending, candidates = batch
    stranger = make_decision(candidate(9), "accept", "ann")
    with pytest.raises(ReviewError, match="no candidate 'c9'"):
        finish_batch(artifacts, pending.batch, candidates, [stranger])


def test_auto_policy_rejects_by_rule_and_records_the_auto_reviewer(batch):
    _, _, candidates = batch
    policy = AutoPolicy(
        default="accept", reject_if=[{"pattern": r"(?i)\bas an ai\b", "reason": "AI disclaimer"}]
    )
    decisions = auto_decide(policy, candidates)
    assert [(d.decision, d.reason) for d in decisions] == [
        ("accept", None),
        ("reject", "AI disclaimer"),
        ("accept", None),
    ]
    assert {d.reviewer for d in decisions} == {AUTO_REVIEWER}
    assert all(d.reason for d in auto_decide(AutoPolicy(default="reject"), candidates))


def test_auto_review_needs_an_explicit_policy():
    with pytest.raises(ValueError, match="auto needs an explicit policy"):
        ReviewSpec(how="auto")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AutoPolicy(default="accept", reject_if=[{"pattern": "(", "reason": "x"}])


def test_form_round_trip_prefills_and_validates(batch):
    artifacts, pending, candidates = batch
    made = {"c1": make_decision(candidates[0], "edit", "ann", answer="Edited.")}
    form = to_form_input(candidates, made, "ann")
    assert [row["answer"] for row in form["rows"]] == ["Edited.", "As an AI, I cannot.", "Answer 3."]
    assert form["rows"][0]["decision"] == "edit"

    form["rows"][1].update(decision="reject", reason="")
    form["rows"][2]["answer"] = "Answer 3, improved."  # changed but left on accept: kept as an edit
    decisions, problems = from_form_input(candidates, form)
    assert problems == [
        "row 2 (c2): a reject needs a reason (it is fed back to the teacher as a common mistake)"
    ]
    assert [(d.id, d.decision) for d in decisions] == [("c1", "edit"), ("c3", "edit")]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_export_then_import_stores_the_same_decisions(batch, tmp_path, suffix):
    artifacts, pending, candidates = batch
    record_decision(artifacts, pending.batch, make_decision(candidates[0], "accept", "ann"))
    path = tmp_path / f"review{suffix}"
    assert export_batch(artifacts, pending, path) == 3

    if suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["decision"] for r in rows] == ["accept", "", ""]
    rows[1].update(decision="reject", reason="claims to be an AI")
    rows[2].update(decision="edit", edited_answer="Answer 3, with detail.")
    if suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    found, final = import_decisions(artifacts, path, "bob")
    assert found.batch == pending.batch
    assert [(d["id"], d["decision"], d["reviewer"]) for d in final] == [
        ("c1", "accept", "ann"),
        ("c2", "reject", "bob"),
        ("c3", "edit", "bob"),
    ]
    assert final[1]["reason"] == "claims to be an AI"
    assert final[2]["messages"][-1]["content"] == "Answer 3, with detail."
    assert list_pending(artifacts) == []


def test_import_names_the_bad_line(batch, tmp_path):
    artifacts, pending, _ = batch
    path = tmp_path / "review.jsonl"
    export_batch(artifacts, pending, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1].update(decision="reject", reason="")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ReviewError, match=r"review\.jsonl:2: a reject needs a reason"):
        import_decisions(artifacts, path, "bob")
    rows[1].update(decision="maybe")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ReviewError, match=r"review\.jsonl:2: decision 'maybe'"):
        import_decisions(artifacts, path, "bob")


def test_partial_import_keeps_the_batch_pending(batch, tmp_path):
    artifacts, pending, _ = batch
    path = tmp_path / "review.jsonl"
    export_batch(artifacts, pending, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["decision"] = "accept"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert import_decisions(artifacts, path, "bob")[1] is None
    assert [b.batch for b in list_pending(artifacts, "brave")] == [pending.batch]
    assert set(read_decisions(artifacts, pending.batch)) == {"c1"}
