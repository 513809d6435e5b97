"""The LLM judge against the loopback OpenAI server: both orders asked and combined, win rates and
position consistency, malformed verdicts, record/replay, the stage cache, the champion pair, and
the suites' rubric assertions judged pass/fail."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from openai_server import Reply, server_error
from pydantic import ValidationError

from tuneline.augment.teacher import TeacherUnreachable
from tuneline.evaluate import suites
from tuneline.evaluate.judge import JudgeError, judge_table, rubric_judge, run_judge
from tuneline.pipeline import evaluate_key, judge_key
from tuneline.recipe import EvaluateSpec, JudgeSpec, ModelSpec
from tuneline.store import StageRef, check_ledger, find_stage, iter_records, read_stats, write_stage

ROWS = [
    {
        "id": f"r{n}",
        "prompt": [
            {"role": "system", "content": "Label the message."},
            {"role": "user", "content": f"question {n}: I want my money back"},
        ],
        "reference": "refund",
        "base": f"base reply {n}",
        "tuned": f"tuned reply {n}",
    }
    for n in range(3)
]


def evaluated_stage(root: Path, rows: list[dict], digest: str = "e0") -> StageRef:
    """An evaluate stage holding just `predictions.jsonl`, as the judge reads it."""
    with write_stage(root, "evaluate", digest) as writer:
        for row in rows:
            writer.count_in()
            writer.keep(row, "predictions.jsonl")
    return find_stage(root, "evaluate", digest)


def judge_spec(server, tmp_path: Path, **changes) -> JudgeSpec:
    endpoint = {
        "base_url": server.base_url,
        "model": "judge",
        "mode": "live",
        "recordings": str(tmp_path / "recordings"),
        "max_retries": 0,
        "timeout_s": 10,
    } | changes.pop("endpoint", {})
    return JudgeSpec(endpoint=endpoint, **changes)


def reply_in(request, letter: str) -> str:
    """The text of reply A or B in a pairwise request."""
    return re.search(rf"<reply_{letter}>\n(.*?)\n</reply_{letter}>", request.user_text, re.DOTALL).group(1)


def prefers(word: str):
    """A judge that picks the reply containing `word` (a tie when neither does), in any order."""

    def script(request) -> str:
        for letter in "AB":
            if word in reply_in(request, letter):
                return json.dumps({"winner": letter, "reason": f"{letter} is the {word} one"})
        return json.dumps({"winner": "tie", "reason": "equally good"})

    return script


def lines(ref: StageRef, name: str) -> list[dict]:
    return list(iter_records(ref, name))


def test_a_fair_judge_gives_wins_and_both_orders_are_asked(teacher_server, tmp_path):
    teacher_server.script = prefers("tuned")
    evaluated = evaluated_stage(tmp_path / "art", ROWS)

    judged = run_judge(tmp_path / "art", evaluated, judge_spec(teacher_server, tmp_path))

    assert teacher_server.count == 6  # 3 examples x 2 orders
    verdicts = lines(judged, "verdicts.jsonl")
    assert [(v["id"], v["order"], v["A"], v["B"], v["winner"]) for v in verdicts[:2]] == [
        ("r0", "AB", "tuned", "base", "A"),
        ("r0", "BA", "base", "tuned", "B"),  # the swap: the tuned reply is now B, and still wins
    ]
    assert verdicts[0]["reason"] == "A is the tuned one"
    stats = read_stats(judged)
    assert stats["judge_model"] == "judge"
    assert stats["pairs"]["base"] | {} == {
        "wins": 3,
        "losses": 0,
        "ties": 0,
        "no_verdict": 0,
        "identical": 0,
        "win_rate": 1.0,
        "position_consistency": 1.0,
    }
    assert stats["skipped"] == {
        "champion": "the evaluate stage scored no champion (the registry had none when it ran)"
    }
    judgments = lines(judged, "judgments.jsonl")
    assert judgments[0] == {
        "id": "r0",
        "pairs": {"base": {"winner": "tuned", "consistent": True, "reason": "A is the tuned one"}},
    }
    assert check_ledger(judged) == {"in": 3, "out": 3, "dropped": {}}
    # The request carries the rubric (the default), the conversation and the reference.
    system, user = next(r.messages for r in teacher_server.requests if "question 0" in r.user_text)
    assert "answers the user's last message correctly" in system["content"]
    assert user["content"].startswith("<conversation>\n[system]\nLabel the message.\n\n[user]\nquestion 0")
    assert "<reference_answer>\nrefund\n</reference_answer>" in user["content"]


def test_a_judge_that_always_says_a_gives_ties_and_no_position_consistency(teacher_server, tmp_path):
    teacher_server.script = lambda request: '{"winner": "A", "reason": "first is best"}'
    evaluated = evaluated_stage(tmp_path / "art", ROWS)

    judged = run_judge(tmp_path / "art", evaluated, judge_spec(teacher_server, tmp_path))

    pair = read_stats(judged)["pairs"]["base"]
    assert (pair["wins"], pair["losses"], pair["ties"]) == (0, 0, 3)
    assert pair["win_rate"] == 0.5 and pair["position_consistency"] == 0.0
    result = lines(judged, "judgments.jsonl")[0]["pairs"]["base"]
    assert result == {
        "winner": "tie",
        "consistent": False,
        "reason": "the orders disagree (AB picked tuned, BA picked base): position bias, a tie",
    }


def test_win_rate_counts_ties_half_and_identical_replies_are_not_asked(teacher_server, tmp_path):
    rows = [
        ROWS[0],  # tuned wins
        ROWS[1] | {"base": "base reply, the good one"},  # base wins
        ROWS[2] | {"tuned": "same", "base": "same"},  # identical: a tie without asking
    ]
    teacher_server.script = prefers("good")
    (tmp_path / "rubric.txt").write_text("The good reply wins.\n", encoding="utf-8")
    spec = judge_spec(teacher_server, tmp_path, rubric_file=str(tmp_path / "rubric.txt"))

    judged = run_judge(tmp_path / "art", evaluated_stage(tmp_path / "art", rows), spec)

    assert teacher_server.count == 4
    assert "The good reply wins." in teacher_server.requests[0].messages[0]["content"]
    pair = read_stats(judged)["pairs"]["base"]
    # r0: neither is "good" -> a consistent tie; r1: base wins; r2: identical -> tie
    assert (pair["wins"], pair["losses"], pair["ties"], pair["identical"]) == (0, 1, 2, 1)
    assert pair["win_rate"] == pytest.approx((0 + 0.5 * 2) / 3)
    assert pair["position_consistency"] == 1.0  # the identical pair was never asked


def test_champion_pair_is_judged_when_the_predictions_have_its_replies(teacher_server, tmp_path):
    rows = [row | {"champion": f"champion reply {n}, the best"} for n, row in enumerate(ROWS)]
    teacher_server.script = prefers("best")
    evaluated = evaluated_stage(tmp_path / "art", rows)

    judged = run_judge(tmp_path / "art", evaluated, judge_spec(teacher_server, tmp_path, max_examples=2))

    assert teacher_server.count == 2 * 2 * 2  # 2 examples x 2 opponents x 2 orders
    stats = read_stats(judged)
    assert stats["skipped"] == {}
    assert stats["pairs"]["champion"]["losses"] == 2 and stats["pairs"]["champion"]["win_rate"] == 0.0
    assert stats["pairs"]["base"]["ties"] == 2
    assert check_ledger(judged) == {"in": 3, "out": 2, "dropped": {"beyond_max_examples": 1}}
    rows_shown, caption = judge_table(stats)
    assert [row["tuned vs"] for row in rows_shown] == ["base", "champion"]
    assert caption.startswith("Judge judge:")


def test_a_malformed_verdict_is_recorded_not_a_crash(teacher_server, tmp_path):
    def script(request) -> str:
        if "question 0" in request.user_text:
            return "I think A is better."  # no JSON at all
        if "question 1" in request.user_text:  # JSON inside prose, the winner spelled loosely
            letter = "a" if "tuned" in reply_in(request, "A") else "b"
            return f'Verdict: {{"winner": "{letter}", "reason": "more accurate"}} Hope this helps.'
        return '{"winner": "C"}'  # JSON of the wrong shape

    teacher_server.script = script
    judged = run_judge(
        tmp_path / "art", evaluated_stage(tmp_path / "art", ROWS), judge_spec(teacher_server, tmp_path)
    )

    pair = read_stats(judged)["pairs"]["base"]
    assert (pair["wins"], pair["no_verdict"], pair["win_rate"]) == (1, 2, 1.0)
    first = lines(judged, "verdicts.jsonl")[0]
    assert first["winner"] is None and first["raw"] == "I think A is better."
    assert first["problem"].startswith("malformed: not JSON")
    results = [j["pairs"]["base"] for j in lines(judged, "judgments.jsonl")]
    assert results[0]["winner"] is None and results[0]["reason"].startswith("no verdict; AB: malformed")
    assert "winner: Input should be 'A', 'B' or 'tie'" in results[2]["reason"]


def test_recorded_verdicts_replay_without_a_server_and_the_stage_is_cached(teacher_server, tmp_path):
    teacher_server.script = prefers("tuned")
    evaluated = evaluated_stage(tmp_path / "art", ROWS)
    recorded = judge_spec(teacher_server, tmp_path, endpoint={"mode": "record"})
    first = run_judge(tmp_path / "art", evaluated, recorded)
    assert run_judge(tmp_path / "art", evaluated, recorded) == first  # cached: asks nothing
    assert teacher_server.count == 6
    teacher_server.stop()

    # Replay mode, another endpoint URL: the same verdict settings, so the finished stage is reused.
    offline = recorded.model_copy(
        update={
            "endpoint": recorded.endpoint.model_copy(update={"mode": "replay", "base_url": "http://gone/v1"})
        }
    )
    assert judge_key(offline, evaluated) == first.digest
    assert run_judge(tmp_path / "art", evaluated, offline) == first
    # In a fresh store the recordings answer every request, with no server.
    replayed = run_judge(tmp_path / "other", evaluated_stage(tmp_path / "other", ROWS), offline)
    assert lines(replayed, "judgments.jsonl") == lines(first, "judgments.jsonl")
    assert read_stats(replayed)["requests"]["recorded"] == 6
    # A changed rubric is new work, and replay names the judge's field to fix.
    with pytest.raises(JudgeError, match=r"evaluate\.judge\.endpoint\.mode=replay: 6 of 6 request"):
        run_judge(tmp_path / "art", evaluated, offline.model_copy(update={"rubric": "Shorter wins."}))


def test_failed_requests_fail_the_stage_and_the_next_try_asks_only_them(teacher_server, tmp_path):
    fair = prefers("tuned")
    teacher_server.script = lambda r: server_error(503) if "question 2" in r.user_text else fair(r)
    spec = judge_spec(teacher_server, tmp_path, endpoint={"mode": "record"})
    evaluated = evaluated_stage(tmp_path / "art", ROWS)
    with pytest.raises(TeacherUnreachable, match="2 of 6 request.*HTTP 503.*asks only the failed ones"):
        run_judge(tmp_path / "art", evaluated, spec)
    assert find_stage(tmp_path / "art", "judge", judge_key(spec, evaluated)) is None

    teacher_server.script = fair
    before = teacher_server.count
    judged = run_judge(tmp_path / "art", evaluated, spec)
    assert teacher_server.count - before == 2
    assert read_stats(judged)["pairs"]["base"]["wins"] == 3


def test_a_refused_request_is_a_pair_without_verdict(teacher_server, tmp_path):
    fair = prefers("tuned")
    too_long = Reply(status=400, raw_body='{"error": {"message": "context too long"}}')
    cut_off = Reply('{"winner": "A", "rea', finish_reason="length")
    teacher_server.script = lambda r: (
        too_long if "question 1" in r.user_text else cut_off if "question 2" in r.user_text else fair(r)
    )
    judged = run_judge(
        tmp_path / "art", evaluated_stage(tmp_path / "art", ROWS), judge_spec(teacher_server, tmp_path)
    )
    result = lines(judged, "judgments.jsonl")[1]["pairs"]["base"]
    assert result["winner"] is None
    assert "request failed: HTTP 400: context too long" in result["reason"]
    cut = lines(judged, "judgments.jsonl")[2]["pairs"]["base"]["reason"]
    assert "reply cut off at max_tokens=512; raise evaluate.judge.endpoint.max_tokens" in cut
    assert read_stats(judged)["pairs"]["base"]["no_verdict"] == 2


def test_rubric_assertions_are_judged_pass_or_fail(teacher_server, tmp_path):
    def script(request) -> str:
        reply = re.search(r"<reply>\n(.*?)\n</reply>", request.user_text, re.DOTALL).group(1)
        if "garbled" in reply:
            return "hmm"
        polite = "please" in reply
        return json.dumps({"satisfied": "yes" if polite else "no", "reason": f"polite: {polite}"})

    teacher_server.script = script
    suite = suites.Suite.model_validate(
        {
            "system": "Be helpful.",
            "cases": [
                {"name": "ok", "prompt": "refund?", "assert": [{"rubric": "Polite"}, {"contains": "refund"}]},
                {"name": "rude", "prompt": "refund?", "assert": [{"rubric": "Polite"}]},
                {"name": "odd", "prompt": "refund?", "assert": [{"rubric": "Polite"}]},
            ],
        }
    )
    replies = ["refund, please wait", "no refund", "garbled"]

    rows = suites.run_checks("s", suite, replies, rubric_judge(judge_spec(teacher_server, tmp_path)))

    assert [(row["case"], row["kind"], row["passed"]) for row in rows] == [
        ("ok", "rubric", True),
        ("ok", "contains", True),
        ("rude", "rubric", False),
        ("odd", "rubric", None),
    ]
    assert rows[2]["reason"] == "judge: polite: False"
    assert rows[3]["reason"].startswith("not run: the judge's answer is malformed (not JSON")
    criterion, conversation = teacher_server.requests[0].messages
    assert "Polite" in criterion["content"] and "[system]\nBe helpful." in conversation["content"]
    rubric = suites.summarize(rows)["by_kind"]["rubric"]
    assert (rubric["passed"], rubric["failed"], rubric["not_run"], rubric["pass_rate"]) == (1, 1, 1, 0.5)
    assert rubric["reason"].startswith("not run: the judge's answer is malformed")
    # Without a judge the rubric stays not run, as before.
    assert suites.run_checks("s", suite, replies)[0]["reason"] == suites.NO_JUDGE


def test_keys_leave_out_where_the_judge_is_and_the_pairwise_settings_stay_out_of_evaluate(tmp_path):
    spec = JudgeSpec(endpoint={"base_url": "http://a/v1", "model": "judge"})
    moved = spec.model_copy(
        update={"endpoint": spec.endpoint.model_copy(update={"base_url": "http://b/v1", "concurrency": 9})}
    )
    evaluated = StageRef(stage="evaluate", digest="e0", path=str(tmp_path))
    assert judge_key(moved, evaluated) == judge_key(spec, evaluated)
    assert judge_key(spec.model_copy(update={"rubric": "Short wins."}), evaluated) != judge_key(
        spec, evaluated
    )

    splits = StageRef(stage="split", digest="s0", path=str(tmp_path))
    trained = StageRef(stage="train", digest="t0", path=str(tmp_path))
    model = ModelSpec(name="m")
    key = lambda evaluate: evaluate_key(model, evaluate, splits, trained)  # noqa: E731
    assert key(EvaluateSpec(judge=spec)) == key(EvaluateSpec())  # no suites: the judge plays no part
    (tmp_path / "suite.yaml").write_text("cases: [{prompt: hi, assert: [{rubric: polite}]}]\n")
    with_suite = EvaluateSpec(suites=[str(tmp_path / "suite.yaml")], judge=spec)
    assert key(with_suite.model_copy(update={"judge": spec.model_copy(update={"rubric": "x"})})) == key(
        with_suite
    )
    other_model = spec.model_copy(update={"endpoint": spec.endpoint.model_copy(update={"model": "bigger"})})
    assert key(with_suite.model_copy(update={"judge": other_model})) != key(with_suite)


def test_judge_section_errors_name_the_field(tmp_path):
    endpoint = {"base_url": "http://a/v1", "model": "judge"}
    with pytest.raises(ValidationError, match="give the rubric as text .rubric. or as a file"):
        JudgeSpec(endpoint=endpoint, rubric="x", rubric_file="r.txt")
    with pytest.raises(ValidationError, match="names an opponent twice"):
        JudgeSpec(endpoint=endpoint, pairs=["base", "base"])
    assert JudgeSpec(endpoint=endpoint).endpoint.temperature == 0.0
    missing = JudgeSpec(endpoint=endpoint, rubric_file=str(tmp_path / "nope.txt"))
    with pytest.raises(Exception, match=r"evaluate\.judge\.rubric_file: file .*nope\.txt not found"):
        judge_key(missing, StageRef(stage="evaluate", digest="e0", path=str(tmp_path)))


def test_the_evaluate_stage_asks_the_judge_about_rubric_assertions(teacher_server, tmp_path, monkeypatch):
    from tuneline import models
    from tuneline.evaluate.stage import run_evaluate
    from tuneline.records import make_record

    monkeypatch.chdir(tmp_path)  # suite paths are relative to the project folder
    conversation = [{"role": "user", "content": "money back"}, {"role": "assistant", "content": "refund"}]
    base_dir = models.make_tiny_model(
        tmp_path / "base",
        ["money back refund"] * 3,
        vocab_size=300,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
    )
    with write_stage(tmp_path / "art", "split", "s0") as writer:
        writer.count_in()
        writer.keep(make_record(conversation), "test.jsonl")
    with write_stage(tmp_path / "art", "train", "t0") as writer:  # a "tuned" model equal to the base
        shutil.copytree(base_dir, writer.path("model"))
    splits, trained = find_stage(tmp_path / "art", "split", "s0"), find_stage(tmp_path / "art", "train", "t0")
    Path("suite.yaml").write_text("cases:\n  - prompt: money back\n    assert:\n      - rubric: Polite\n")
    teacher_server.script = lambda request: '{"satisfied": "no", "reason": "curt"}'
    spec = EvaluateSpec(max_new_tokens=2, suites=["suite.yaml"], judge=judge_spec(teacher_server, tmp_path))

    evaluated = run_evaluate(tmp_path / "art", splits, trained, ModelSpec(name=str(base_dir)), spec)

    stats = read_stats(evaluated)["suites"]
    assert stats["tuned"]["by_kind"]["rubric"] == {"passed": 0, "failed": 1, "not_run": 0, "pass_rate": 0.0}
    assert stats["tuned_failures"] == [
        {"suite": "suite.yaml", "case": "case 1", "kind": "rubric", "reason": "judge: curt"}
    ]
    assert teacher_server.count == 2  # base and tuned, one rubric each
