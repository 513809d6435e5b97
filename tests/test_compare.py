"""Blind pairwise comparison: a batch of pairs sampled from the evaluate stage's predictions,
answered through the Prefect API (the run pauses, another thread resumes it), a terminal or a
file; stored so nothing is asked twice; rated over the registered model's ledger."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.evaluate.compare import (
    build_items,
    finished_answers,
    list_pending,
    model_ids,
    read_answers,
    read_items,
    read_ledger,
    to_form_input,
)
from tuneline.recipe import HumanSpec
from tuneline.store import StageRef, find_stage, read_stats, write_stage

MODEL = "support-bot"
QUESTIONS = [f"How do I reset password number {n}?" for n in range(6)]


def write_evaluated(artifacts: Path, *, champion: bool = True, train_digest: str = "train111") -> StageRef:
    """An evaluate stage as the evaluate task leaves it: predictions with base, tuned and (when the
    registry had one) champion replies. The tuned model is better than base, alike to champion."""
    trained = StageRef(stage="train", digest=train_digest, path=str(artifacts / "trained"))
    digest = f"ev-{train_digest}-{champion}"
    with write_stage(artifacts, "evaluate", digest, [trained]) as writer:
        for number, question in enumerate(QUESTIONS):
            row = {
                "id": f"ex{number}",
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
                "reference": "Open settings.",
                "base": f"I do not know ({number}).",
                "tuned": "Open settings, then Security." if number else "Same reply.",
            }
            if champion:
                row["champion"] = "Open settings." if number else "Same reply."
            writer.count_in()
            writer.keep(row, "predictions.jsonl")
        writer.stats = {"examples": len(QUESTIONS)} | ({"champion_version": "3"} if champion else {})
    return find_stage(artifacts, "evaluate", digest)


def pick_tuned(item: dict[str, Any]) -> str:
    """What a person who prefers the tuned model answers (they never see the sides)."""
    return "A" if item["side_a"] == "tuned" else "B"


def test_pairs_are_blind_seeded_and_the_sides_shuffled(tmp_path):
    evaluated = write_evaluated(tmp_path)
    ids = model_ids(tmp_path, evaluated, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert ids == {
        "base": "base:HuggingFaceTB/SmolLM2-135M-Instruct",
        "tuned": "tuned:train111",
        "champion": "champion:v3",
    }
    rows = [json.loads(line) for line in evaluated.file("predictions.jsonl").read_text().splitlines()]
    spec = HumanSpec(samples=4, seed=7)
    batch, items = build_items(rows, spec, ids)
    assert (batch, items) == build_items(rows, spec, ids)  # same seed, same batch
    assert len(items) == 8 and {i["pair"] for i in items} == {"base", "champion"}
    assert {i["side_a"] for i in items} == {"tuned", "base", "champion"}  # both orders occur
    assert all("tuned" not in i["id"] and "base" not in i["id"] for i in items)
    assert build_items(rows, HumanSpec(samples=4, seed=8), ids)[0] != batch

    # the champion is named by the train stage of the run that registered it, when that run's
    # register stage is in this artifacts folder: the same model under one name in the ledger
    earlier = StageRef(stage="train", digest="train000", path="-")
    with write_stage(tmp_path, "register", "reg1", [earlier]) as writer:
        writer.stats = {"model_name": MODEL, "version": "3"}
    assert model_ids(tmp_path, evaluated, "m", MODEL)["champion"] == "tuned:train000"

    # no champion column (no champion in the registry): only the pairs against base
    no_champion = write_evaluated(tmp_path, champion=False)
    rows = [json.loads(line) for line in no_champion.file("predictions.jsonl").read_text().splitlines()]
    _, items = build_items(rows, spec, model_ids(tmp_path, no_champion, "base-model"))
    assert {i["pair"] for i in items} == {"base"} and len(items) == 4


# --- through the Prefect API: the run pauses, another thread answers through resume_flow_run ---


def start_compare_flow(artifacts: Path, human: HumanSpec, evaluated: StageRef, **kwargs: Any) -> dict:
    """The comparison as the finetune flow runs it, in a thread; `result` gets the stage path."""
    from prefect import flow
    from tuneline.flows.compare import compare_replies

    @flow(name="compare-test")
    def compare_flow() -> str | None:
        found = compare_replies(artifacts, human, evaluated, MODEL, "tiny-base", **kwargs)
        return found.path if found else None

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["path"] = compare_flow()
        except Exception as error:  # noqa: BLE001 - the test thread reports it
            outcome["error"] = error

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def wait_for_pause(artifacts: Path, outcome: dict, asks: int = 1):  # noqa: ANN201 - a PendingComparison
    """The waiting batch once its run is paused for the `asks`-th time."""
    from prefect import get_client

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert "error" not in outcome, outcome.get("error")
        waiting = list_pending(artifacts)
        if waiting:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(UUID(waiting[0].run_id))
            if run.state.is_paused() and run.state.state_details.pause_key.endswith(f"-{asks}"):
                return waiting[0]
        time.sleep(0.2)
    raise AssertionError("the run did not pause for comparisons within 60 s")


def test_a_batch_answered_through_the_prefect_api_is_rated_and_never_asked_again(prefect_server, tmp_path):
    from prefect.flow_runs import resume_flow_run

    artifacts = tmp_path / "art"
    evaluated = write_evaluated(artifacts)
    human = HumanSpec(samples=3, seed=1, rater="ann", bootstrap=20)
    outcome = start_compare_flow(artifacts, human, evaluated)
    pending = wait_for_pause(artifacts, outcome)
    items = read_items(artifacts, pending.batch)
    assert pending.count == 6 and pending.model_name == MODEL

    # the form shows A and B, never the models; ann answers two pairs and leaves the rest undecided
    form = to_form_input(items, read_answers(artifacts, pending.batch), "ann")
    asked = len(form["rows"])  # 6, less a pair whose two replies are the same (a tie nobody is asked)
    assert set(form["rows"][0]) == {"id", "prompt", "reply_a", "reply_b", "winner"}
    assert form["rows"][0]["prompt"].split("\n")[0] == "[system] Be brief."  # the task, then the question
    assert form["rows"][0]["prompt"].split("\n[user] ")[1] in QUESTIONS
    by_id = {item["id"]: item for item in items}
    for row in form["rows"][:2]:
        row["winner"] = pick_tuned(by_id[row["id"]])
    resume_flow_run(UUID(pending.run_id), run_input=form)

    again = wait_for_pause(artifacts, outcome, asks=2)  # asked again, for the rest only
    assert again.batch == pending.batch and len(read_answers(artifacts, pending.batch)) == 2 + 6 - asked
    form = to_form_input(items, read_answers(artifacts, pending.batch), "ann")
    assert len(form["rows"]) == asked - 2
    for row in form["rows"]:
        row["winner"] = pick_tuned(by_id[row["id"]]) if by_id[row["id"]]["pair"] == "base" else "tie"
    resume_flow_run(UUID(pending.run_id), run_input=form)
    outcome["thread"].join(timeout=60)
    assert "error" not in outcome, outcome.get("error")

    stats = read_stats(StageRef(stage="compare", digest="-", path=outcome["path"]))
    assert stats["batch"] == pending.batch and stats["raters"] == [
        "ann",
        *(["identical-replies"] if asked < 6 else []),
    ]
    assert stats["pairs"]["base"] == {"wins": 3, "losses": 0, "ties": 0, "win_rate": 1.0}
    champion = stats["pairs"]["champion"]
    assert champion["wins"] + champion["ties"] == 3 and champion["losses"] == 0
    board = {row["model"]: row for row in stats["leaderboard"]}
    assert set(board) == {"tuned:train111", "base:tiny-base", "champion:v3"}
    assert board["tuned:train111"]["bt"] > board["base:tiny-base"]["bt"]
    assert board["tuned:train111"]["games"] == 6
    assert len(read_ledger(artifacts, MODEL)) == 6 and list_pending(artifacts) == []

    # a re-run finds the answered batch: nobody is asked, the stage is the same
    rerun = start_compare_flow(artifacts, human, evaluated)
    rerun["thread"].join(timeout=60)
    assert "error" not in rerun and rerun["path"] == outcome["path"]
    assert len(read_ledger(artifacts, MODEL)) == 6  # the batch joined the ledger once


# --- through a file and the terminal, with `wait: later` ---


def test_wait_later_leaves_the_batch_to_a_file_and_a_rerun_uses_its_answers(prefect_server, tmp_path):
    artifacts = tmp_path / "art"
    evaluated = write_evaluated(artifacts)
    human = HumanSpec(samples=4, against=["base"], wait="later", bootstrap=20)
    first = start_compare_flow(artifacts, human, evaluated)
    first["thread"].join(timeout=60)
    assert first == {"thread": first["thread"], "path": None}  # the run went on without waiting
    (pending,) = list_pending(artifacts)

    exported = tmp_path / "compare.csv"
    cli = ["compare", "export", pending.run_name, "--to", str(exported), "--artifacts-dir", str(artifacts)]
    done = CliRunner().invoke(app, cli)
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(exported.open()))
    assert [r["winner"] for r in rows] == [""] * 4 and set(rows[0]) == {
        "batch", "id", "prompt", "reply_a", "reply_b", "winner",
    }  # fmt: skip
    assert not any("tuned" in value for row in rows for value in row.values())

    # a typo stores nothing and names file:line
    rows[1]["winner"] = "C"
    write_csv(exported, rows)
    bad = CliRunner().invoke(app, ["compare", "import", str(exported), "--artifacts-dir", str(artifacts)])
    assert bad.exit_code == 2
    assert f"{exported}:3: winner 'C': write A, B or tie" in bad.output
    assert read_answers(artifacts, pending.batch) == {}

    items = {item["id"]: item for item in read_items(artifacts, pending.batch)}
    for row in rows:
        row["winner"] = pick_tuned(items[row["id"]]).lower()
    rows[0]["winner"] = "tie"
    write_csv(exported, rows)
    cli = ["compare", "import", str(exported), "--artifacts-dir", str(artifacts), "--rater", "bob"]
    done = CliRunner().invoke(app, cli)
    assert done.exit_code == 0, done.output
    assert "all 4 comparisons answered" in done.output and "re-run the recipe" in done.output
    assert {a["rater"] for a in finished_answers(artifacts, pending.batch)} == {"bob"}

    rerun = start_compare_flow(artifacts, human, evaluated)
    rerun["thread"].join(timeout=60)
    stats = read_stats(StageRef(stage="compare", digest="-", path=rerun["path"]))
    assert stats["pairs"]["base"] == {"wins": 3, "losses": 0, "ties": 1, "win_rate": 0.875}


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def press(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    """The keys a person presses at `tuneline compare decide`; then the input ends."""
    pressed = iter(keys)
    monkeypatch.setattr("click.getchar", lambda: next(pressed, ""))


def test_the_terminal_asks_only_what_is_unanswered_and_quitting_keeps_the_answers(tmp_path, monkeypatch):
    from tuneline.evaluate.compare import PendingComparison, open_comparison

    artifacts = tmp_path / "art"
    evaluated = write_evaluated(artifacts)
    rows = [json.loads(line) for line in evaluated.file("predictions.jsonl").read_text().splitlines()]
    batch, items = build_items(
        rows, HumanSpec(samples=6, against=["champion"]), model_ids(artifacts, evaluated, "m")
    )
    pending = PendingComparison(
        batch=batch, run_id="local", run_name="calm-fox", model_name=MODEL, count=len(items), wait="pause",
        items_path=str(artifacts / "compare" / batch / "items.jsonl"), created_at="2026-01-01T00:00:00",
    )  # fmt: skip
    open_comparison(artifacts, pending, items)
    identical = [i for i in items if i["a"] == i["b"]]
    assert len(identical) == 1  # "Same reply." on both sides: a tie nobody is asked about
    assert read_answers(artifacts, batch)[identical[0]["id"]].rater == "identical-replies"

    cli = ["compare", "decide", "calm-fox", "--artifacts-dir", str(artifacts), "--rater", "cy"]
    press(monkeypatch, "ab")  # two answers, then the input ends (as q does)
    stopped = CliRunner().invoke(app, cli)
    assert "5 of 6 to go" in stopped.output and "answers kept" in stopped.output
    assert len(read_answers(artifacts, batch)) == 3 and finished_answers(artifacts, batch) is None

    press(monkeypatch, "tts")  # two ties, one skipped
    done = CliRunner().invoke(app, cli)
    assert "3 of 6 to go" in done.output and "1 skipped comparisons still wait" in done.output
    press(monkeypatch, "b")
    done = CliRunner().invoke(app, cli)
    assert "1 of 6 to go" in done.output and "all 6 comparisons answered" in done.output
    assert list_pending(artifacts) == [] and len(read_ledger(artifacts, MODEL)) == 6

    board = CliRunner().invoke(app, ["compare", "ratings", MODEL, "--artifacts-dir", str(artifacts)])
    assert board.exit_code == 0 and "tuned:train111" in board.output and "champion:v3" in board.output


def test_judge_verdicts_are_a_second_rater_beside_the_people(tmp_path):
    from tuneline.evaluate.compare import Answer, PendingComparison, finish_batch, now, open_comparison
    from tuneline.evaluate.compare_stage import run_compare

    artifacts = tmp_path / "art"
    evaluated = write_evaluated(artifacts, champion=False)
    with write_stage(artifacts, "judge", "j1", [evaluated]) as writer:
        for number in range(len(QUESTIONS)):  # the judge prefers tuned except on ex1
            winner = "base" if number == 1 else "tuned"
            writer.count_in()
            writer.keep(
                {"id": f"ex{number}", "pairs": {"base": {"winner": winner, "reason": "..."}}},
                "judgments.jsonl",
            )
        writer.count_in()  # a pair the judge could not decide is no battle
        writer.keep(
            {"id": "ex9", "pairs": {"base": {"winner": None, "reason": "no verdict"}}}, "judgments.jsonl"
        )
    judged = find_stage(artifacts, "judge", "j1")
    human = HumanSpec(samples=6, against=["base"], bootstrap=20)
    rows = [json.loads(line) for line in evaluated.file("predictions.jsonl").read_text().splitlines()]
    batch, items = build_items(rows, human, model_ids(artifacts, evaluated, "m"))
    pending = PendingComparison(
        batch=batch, run_id="local", run_name="r", model_name=MODEL, count=6, wait="pause",
        items_path="-", created_at=now(),
    )  # fmt: skip
    open_comparison(artifacts, pending, items)
    from tuneline.evaluate.compare import record_answer

    for item in items:  # people prefer tuned everywhere
        record_answer(artifacts, batch, Answer(id=item["id"], winner=pick_tuned(item), rater="dee", at=now()))
    finish_batch(artifacts, batch, MODEL)

    compared = run_compare(artifacts, human, evaluated, batch, model_name=MODEL, base_name="m", judged=judged)
    stats = read_stats(compared)
    assert stats["pairs"]["base"]["win_rate"] == 1.0
    assert stats["judge"]["pairs"]["base"] == {"wins": 5, "losses": 1, "ties": 0, "win_rate": 0.8333}
    assert (
        stats["judge"]["agreement"] == pytest.approx(5 / 6, abs=1e-4)
        and stats["judge"]["agreement_items"] == 6
    )
    kinds = [row["kind"] for row in read_ledger(artifacts, MODEL)]
    assert kinds.count("human") == 6 and kinds.count("judge") == 6
    assert [row["model"] for row in stats["leaderboard"]] == ["tuned:train111", "base:m"]
