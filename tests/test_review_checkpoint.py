"""The review checkpoint's loop without Prefect: a plain function stands in for the paused run's
form, so each test says what reviewers submit and checks what is stored, asked again or given up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tuneline.augment.checkpoint import (
    MAX_SUBMISSIONS,
    review_instructions,
    review_round,
    review_timeout,
)
from tuneline.augment.review import (
    AUTO_REVIEWER,
    PendingBatch,
    ReviewTimeout,
    finish_batch,
    finished_decisions,
    list_pending,
    make_decision,
    read_decisions,
)
from tuneline.augment.rounds import CANDIDATES, read_candidates
from tuneline.recipe import ReviewSpec
from tuneline.store import StageRef, find_stage, write_stage

RUN = {"run_id": "0b5e-run", "run_name": "brave-otter", "api_url": "http://127.0.0.1:4200/api"}


def write_round(artifacts_dir: Path, answers: list[str]) -> StageRef:
    """An augment_round stage holding one candidate per answer (what the teacher round leaves)."""
    with write_stage(artifacts_dir, "augment_round", f"round-{len(answers)}") as writer:
        for number, answer in enumerate(answers, start=1):
            writer.count_in()
            messages = [{"role": "user", "content": f"Question {number}?"},
                        {"role": "assistant", "content": answer}]  # fmt: skip
            record = {"id": f"c{number}", "messages": messages, "tools": None, "meta": {"round": 1}}
            writer.keep(record, CANDIDATES)
    return find_stage(artifacts_dir, "augment_round", f"round-{len(answers)}")


class Reviewers:
    """The `wait` callable: answers each ask with the next scripted change to the pre-filled form."""

    def __init__(self, *submissions: Any) -> None:
        self.submissions = list(submissions)
        self.asks: list[dict[str, Any]] = []

    def __call__(
        self, pending: PendingBatch, initial_form_data: dict[str, Any], problems: list[str], attempt: int
    ) -> dict[str, Any]:
        self.asks.append(
            {"pending": pending, "form": initial_form_data, "problems": list(problems), "attempt": attempt}
        )
        submit = self.submissions[min(len(self.asks), len(self.submissions)) - 1]
        form = {"reviewer": "qa-lead", "rows": [dict(row) for row in initial_form_data["rows"]]}
        submit(form)
        return form


def never_asked(*args: Any) -> dict[str, Any]:
    raise AssertionError("nobody should be asked")


@pytest.fixture
def generated(tmp_path):
    return write_round(tmp_path / "art", ["Answer 1.", "As an AI, I cannot.", "Answer 3."])


def run(
    tmp_path: Path, generated: StageRef, wait: Any, announced: list | None = None, **spec: Any
) -> list[dict[str, Any]]:
    """One round's review through the core loop, as the flow calls it; `announced` collects the
    batches reviewers were told about."""
    return review_round(
        tmp_path / "art",
        ReviewSpec(**({"how": "prefect", "reviewer": "qa-lead"} | spec)),
        generated,
        1,
        wait=wait,
        announce=(announced if announced is not None else []).append,
        **RUN,
    )


def test_a_complete_first_submission_finishes_the_batch(tmp_path, generated):
    def decide(form: dict) -> None:
        form["rows"][1].update(decision="reject", reason="claims to be an AI")
        form["rows"][2]["answer"] = "Answer 3, with detail."  # changed on accept: kept as an edit

    reviewers, announced = Reviewers(decide), []
    decisions = run(tmp_path, generated, reviewers, announced)

    assert [(d["id"], d["decision"], d["reviewer"]) for d in decisions] == [
        ("c1", "accept", "qa-lead"), ("c2", "reject", "qa-lead"), ("c3", "edit", "qa-lead"),
    ]  # fmt: skip
    assert decisions[2]["messages"][-1]["content"] == "Answer 3, with detail."
    (ask,) = reviewers.asks
    assert (ask["attempt"], ask["problems"]) == (1, [])
    assert [row["answer"] for row in ask["form"]["rows"]] == ["Answer 1.", "As an AI, I cannot.", "Answer 3."]
    (pending,) = announced  # reviewers were told once, with the run they resume
    assert (pending.run_name, pending.run_id, pending.api_url, pending.count) == (
        "brave-otter", "0b5e-run", RUN["api_url"], 3,
    )  # fmt: skip
    assert finished_decisions(tmp_path / "art", pending.batch) == decisions
    assert list_pending(tmp_path / "art") == []


def test_a_reject_without_reason_is_asked_again_with_the_problem_and_the_good_rows_kept(tmp_path, generated):
    def forgetful(form: dict) -> None:
        form["rows"][0].update(decision="reject", reason="")
        form["rows"][1].update(decision="reject", reason="claims to be an AI")

    def fixed(form: dict) -> None:
        form["rows"][0].update(decision="reject", reason="answers a question nobody asked")

    reviewers = Reviewers(forgetful, fixed)
    decisions = run(tmp_path, generated, reviewers)

    first, second = reviewers.asks
    assert (first["problems"], second["attempt"]) == ([], 2)
    assert second["problems"] == [
        "row 1 (c1): a reject needs a reason (it is fed back to the teacher as a common mistake)"
    ]
    # the second form is pre-filled from what was stored: the good rows, not the refused one
    assert [(row["decision"], row["reason"]) for row in second["form"]["rows"]] == [
        ("accept", ""), ("reject", "claims to be an AI"), ("accept", ""),
    ]  # fmt: skip
    assert [(d["decision"], d["reason"]) for d in decisions] == [
        ("reject", "answers a question nobody asked"), ("reject", "claims to be an AI"), ("accept", None),
    ]  # fmt: skip


def test_a_batch_finished_in_the_terminal_meanwhile_is_taken_as_it_is(tmp_path, generated):
    candidates = read_candidates(generated)

    def decided_elsewhere(form: dict) -> None:
        # while the run waits, someone decides every candidate with `tuneline review decide`
        batch = reviewers.asks[-1]["pending"].batch
        finish_batch(
            tmp_path / "art", batch, candidates, [make_decision(c, "accept", "ann") for c in candidates]
        )
        form["rows"][0].update(decision="reject", reason="a stale form")

    reviewers = Reviewers(decided_elsewhere)
    decisions = run(tmp_path, generated, reviewers)
    assert len(reviewers.asks) == 1
    assert [(d["decision"], d["reviewer"]) for d in decisions] == [("accept", "ann")] * 3


def test_a_finished_batch_is_never_asked_about_again(tmp_path, generated):
    first = run(tmp_path, generated, Reviewers(lambda form: None))
    announced = []
    assert run(tmp_path, generated, never_asked, announced) == first
    assert announced == []


def test_the_auto_policy_decides_without_asking(tmp_path, generated):
    policy = {"default": "accept", "reject_if": [{"pattern": r"(?i)\bas an ai\b", "reason": "AI disclaimer"}]}
    announced = []
    decisions = run(tmp_path, generated, never_asked, announced, how="auto", auto=policy)
    assert [(d["decision"], d["reason"], d["reviewer"]) for d in decisions] == [
        ("accept", None, AUTO_REVIEWER), ("reject", "AI disclaimer", AUTO_REVIEWER),
        ("accept", None, AUTO_REVIEWER),
    ]  # fmt: skip
    assert announced == [] and list_pending(tmp_path / "art") == []


def test_a_round_without_candidates_asks_nothing(tmp_path):
    assert run(tmp_path, write_round(tmp_path / "art", []), never_asked) == []


def test_after_the_most_submissions_the_run_gives_up_saying_how_to_finish(tmp_path, generated):
    def always_forgetful(form: dict) -> None:
        form["rows"][0].update(decision="reject", reason="")

    reviewers = Reviewers(always_forgetful)
    with pytest.raises(ReviewTimeout) as failure:
        run(tmp_path, generated, reviewers)

    assert [ask["attempt"] for ask in reviewers.asks] == list(range(1, MAX_SUBMISSIONS + 1))
    text = str(failure.value)
    assert f"{MAX_SUBMISSIONS} review forms had problems (row 1 (c1): a reject needs a reason" in text
    assert "`tuneline review decide brave-otter`" in text
    assert "`tuneline review export brave-otter --to review.csv`" in text
    (pending,) = list_pending(tmp_path / "art")  # still waiting, with the good rows kept
    assert set(read_decisions(tmp_path / "art", pending.batch)) == {"c2", "c3"}


def test_the_instructions_name_the_run_and_the_recipes_way(tmp_path, generated):
    reviewers = Reviewers(lambda form: None)
    run(tmp_path, generated, reviewers, how="file")
    pending = reviewers.asks[0]["pending"]

    form = review_instructions(pending, [pending.how], ["row 1 (c1): a reject needs a reason"])
    assert f"**Round 1: 3 candidates wait for review** (batch `{pending.batch}`" in form
    assert "- file: `tuneline review export brave-otter --to review.csv`" in form
    assert "then `tuneline review import review.csv`" in form
    assert "terminal" not in form and "Prefect UI" not in form
    assert form.endswith("The last submission was not complete:\n- row 1 (c1): a reject needs a reason")

    every_way = review_instructions(pending)
    assert "- Prefect UI:" in every_way and "- terminal: `tuneline review decide brave-otter`" in every_way

    timeout = str(review_timeout(pending, 2))
    assert f"nobody reviewed batch {pending.batch} within review.timeout_s=2" in timeout
    assert "`tuneline review decide brave-otter`" in timeout and "Prefect UI" not in timeout
