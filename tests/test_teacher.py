"""The teacher client against the loopback OpenAI server: concurrency, retries, timeouts, keys,
strict parsing, and record/replay (a recorded run repeats offline with identical replies)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pydantic
import pytest
from openai_server import Reply, openai_server, rate_limited, scripted, server_error

from tuneline.augment.teacher import (
    TeacherError,
    TeacherUnreachable,
    ask_teacher,
    parse_json_reply,
    request_digest,
)
from tuneline.errors import UserError
from tuneline.recipe import TeacherSpec


def make_spec(server, tmp_path: Path, **changes) -> TeacherSpec:
    """A spec for the test server with fast retries; recordings in the test's folder."""
    settings = {
        "base_url": server.base_url,
        "model": "teacher",
        "mode": "live",
        "recordings": str(tmp_path / "recordings"),
        "max_retries": 2,
        "timeout_s": 10,
    }
    return TeacherSpec(**(settings | changes))


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": text}]


def test_concurrency_is_bounded_and_order_kept(teacher_server, tmp_path):
    teacher_server.latency_ms = 100
    spec = make_spec(teacher_server, tmp_path, concurrency=3)
    replies = ask_teacher(spec, [ask(f"question {n}") for n in range(9)])
    assert teacher_server.max_in_flight == 3
    assert [json.loads(r.text)["echo"] for r in replies] == [f"question {n}" for n in range(9)]
    assert all(r.error is None and r.prompt_tokens > 0 and r.completion_tokens > 0 for r in replies)


def test_rate_limit_waits_for_retry_after_then_succeeds(teacher_server, tmp_path):
    teacher_server.script = scripted(rate_limited(retry_after=1))
    replies = ask_teacher(make_spec(teacher_server, tmp_path), [ask("hello")])
    assert replies[0].error is None and json.loads(replies[0].text) == {"echo": "hello"}
    first, second = teacher_server.requests
    assert second.received_at - first.received_at >= 0.9


def test_persistent_server_errors_give_error_replies(teacher_server, tmp_path):
    teacher_server.script = lambda request: server_error(500) if "bad" in request.user_text else '{"ok": 1}'
    spec = make_spec(teacher_server, tmp_path, max_retries=1)
    good, bad = ask_teacher(spec, [ask("good"), ask("bad")])
    assert good.text == '{"ok": 1}' and good.error is None
    assert bad.text is None and bad.error.startswith("HTTP 500 after 1 retries")
    assert teacher_server.count == 3  # the bad request was tried twice


def test_every_request_failing_is_unreachable(teacher_server, tmp_path):
    teacher_server.script = lambda request: server_error(503)
    spec = make_spec(teacher_server, tmp_path, max_retries=1)
    with pytest.raises(TeacherUnreachable, match="all 2 request.*HTTP 503"):
        ask_teacher(spec, [ask("one"), ask("two")])
    assert not isinstance(TeacherUnreachable("x"), UserError)  # the task layer retries it


def test_timeout_is_an_error_reply(teacher_server, tmp_path):
    teacher_server.script = lambda r: Reply('{"late": 1}', delay_ms=1000) if "slow" in r.user_text else "{}"
    spec = make_spec(teacher_server, tmp_path, timeout_s=0.5, max_retries=0)
    fast, slow = ask_teacher(spec, [ask("fast"), ask("slow")])
    assert fast.text == "{}"
    assert slow.text is None and "timed out after 0.5 s" in slow.error


def test_unreachable_endpoint_raises_unreachable(tmp_path):
    with openai_server() as server:
        spec = make_spec(server, tmp_path, max_retries=0)
    with pytest.raises(TeacherUnreachable, match="connection"):
        ask_teacher(spec, [ask("anyone there?")])


def test_api_key_from_the_named_env_var_sent_as_bearer(teacher_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-from-env")
    spec = make_spec(teacher_server, tmp_path, api_key_env="MY_TEACHER_KEY")
    ask_teacher(spec, [ask("a")])
    ask_teacher(spec, [ask("b")], api_key="sk-from-secret")
    sent = [r.headers["Authorization"] for r in teacher_server.requests]
    assert sent == ["Bearer sk-from-env", "Bearer sk-from-secret"]


def test_refused_key_names_the_env_var(teacher_server, tmp_path):
    teacher_server.script = lambda request: Reply(status=401, raw_body='{"error": {"message": "bad key"}}')
    spec = make_spec(teacher_server, tmp_path, api_key_env="MY_TEACHER_KEY")
    with pytest.raises(TeacherError, match="refused the API key.*MY_TEACHER_KEY"):
        ask_teacher(spec, [ask("a"), ask("b")])


def test_unknown_model_names_model_and_base_url(teacher_server, tmp_path):
    teacher_server.script = lambda request: Reply(status=404, raw_body='{"error": {"message": "no model"}}')
    with pytest.raises(TeacherError, match="no model 'teacher'.*teacher.model and teacher.base_url"):
        ask_teacher(make_spec(teacher_server, tmp_path), [ask("a")])


def test_refused_requests_are_error_replies_and_all_refused_is_a_setting(teacher_server, tmp_path):
    teacher_server.script = lambda r: (
        Reply(status=400, raw_body='{"error": {"message": "too long"}}') if "long" in r.user_text else "{}"
    )
    replies = ask_teacher(make_spec(teacher_server, tmp_path), [ask("short"), ask("long")])
    assert [r.error for r in replies] == [None, "HTTP 400: too long"]
    assert teacher_server.count == 2  # a 400 is not retried
    with pytest.raises(TeacherError, match="all 1 request.*HTTP 400: too long.*teacher.json_mode"):
        ask_teacher(make_spec(teacher_server, tmp_path), [ask("long")])
    assert ask_teacher(make_spec(teacher_server, tmp_path), []) == []


def test_sampling_settings_and_json_mode_are_sent(teacher_server, tmp_path):
    spec = make_spec(teacher_server, tmp_path, temperature=0.2, max_tokens=99, seed=7)
    ask_teacher(spec, [ask("a")])
    body = teacher_server.requests[0].body
    assert body["model"] == "teacher" and body["messages"] == ask("a")
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.2, 99, 7)
    assert body["response_format"] == {"type": "json_object"}
    ask_teacher(spec.model_copy(update={"json_mode": False}), [ask("a")])
    assert "response_format" not in teacher_server.requests[1].body


def test_cut_off_reply_is_an_error_and_not_recorded(teacher_server, tmp_path):
    cut = Reply('{"answer": "tru', finish_reason="length")
    teacher_server.script = lambda request: cut if "long" in request.user_text else '{"answer": "ok"}'
    spec = make_spec(teacher_server, tmp_path, mode="record")
    short, long = ask_teacher(spec, [ask("short"), ask("long")])
    assert short.error is None and "max_tokens=2048" in long.error
    assert [p.stem for p in Path(spec.recordings).glob("*.json")] == [short.request_digest]


def test_record_then_replay_offline_gives_identical_replies(tmp_path):
    conversations = [ask("first"), ask("second"), ask("first")]
    answers = iter(['{"n": 1}', '{"n": 2}', '{"n": 3}'])
    with openai_server(lambda request: next(answers)) as server:
        spec = make_spec(server, tmp_path, mode="record", concurrency=1)  # answers in order
        recorded = ask_teacher(spec, conversations)
        again = ask_teacher(spec, conversations)
        assert server.count == 3  # the second run was served from the recording
    assert [r.text for r in recorded] == ['{"n": 1}', '{"n": 2}', '{"n": 3}']
    assert len(list(Path(spec.recordings).glob("*.json"))) == 3  # the repeated prompt kept both answers
    replayed = ask_teacher(spec.model_copy(update={"mode": "replay"}), conversations)
    for live, replay in zip(recorded, replayed, strict=True):
        assert (live.request_digest, live.text, live.prompt_tokens, live.completion_tokens) == (
            replay.request_digest,
            replay.text,
            replay.prompt_tokens,
            replay.completion_tokens,
        )
        assert not live.recorded and replay.recorded
    assert [r.text for r in again] == [r.text for r in recorded] and all(r.recorded for r in again)
    stored = json.loads(Path(spec.recordings, f"{recorded[0].request_digest}.json").read_text())
    assert stored["request"]["messages"] == ask("first") and stored["usage"]["completion_tokens"] == 2


def test_replay_miss_names_the_request_and_the_fix(tmp_path):
    spec = TeacherSpec(
        base_url="http://127.0.0.1:9/v1", model="teacher", mode="replay", recordings=str(tmp_path / "rec")
    )
    conversation = ask("Write three questions about the refund policy")
    with pytest.raises(TeacherError) as caught:
        ask_teacher(spec, [conversation])
    message = str(caught.value)
    assert request_digest(spec, conversation)[:16] in message
    assert "Write three questions about the refund policy" in message
    assert str(tmp_path / "rec") in message and "teacher.mode=record" in message


def test_live_mode_neither_reads_nor_writes_recordings(teacher_server, tmp_path):
    spec = make_spec(teacher_server, tmp_path, mode="record")
    ask_teacher(spec, [ask("a")])
    ask_teacher(spec.model_copy(update={"mode": "live"}), [ask("a"), ask("b")])
    assert teacher_server.count == 3
    assert len(list(Path(spec.recordings).glob("*.json"))) == 1


def test_corrupt_recording_names_the_file(teacher_server, tmp_path):
    spec = make_spec(teacher_server, tmp_path, mode="record")
    (reply,) = ask_teacher(spec, [ask("a")])
    path = Path(spec.recordings, f"{reply.request_digest}.json")
    path.write_text("{truncated")
    with pytest.raises(TeacherError, match="unreadable teacher recording.*delete the file"):
        ask_teacher(spec, [ask("a")])


def test_digest_covers_what_changes_the_answer(tmp_path):
    spec = TeacherSpec(base_url="http://a/v1", model="m")
    base = request_digest(spec, ask("x"))
    assert (
        request_digest(spec.model_copy(update={"base_url": "http://b/v1", "concurrency": 9}), ask("x"))
        == base
    )
    assert request_digest(spec.model_copy(update={"temperature": 0.1}), ask("x")) != base
    assert request_digest(spec.model_copy(update={"model": "n"}), ask("x")) != base
    assert request_digest(spec, ask("y")) != base
    assert request_digest(spec, ask("x"), sample=1) != base


def test_works_inside_a_running_event_loop(teacher_server, tmp_path):
    spec = make_spec(teacher_server, tmp_path)

    async def caller():
        return ask_teacher(spec, [ask("from async")])

    (reply,) = asyncio.run(caller())
    assert json.loads(reply.text) == {"echo": "from async"}


class Question(pydantic.BaseModel):
    question: str
    answer: str


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"question": "Q?", "answer": "A."}', None),
        ('```json\n{"question": "Q?", "answer": "A."}\n```', None),
        ("Sure! Here is your pair: Q? A.", "not JSON"),
        ('Here you go:\n```json\n{"question": "Q?", "answer": "A."}\n```', "not JSON"),
        ('{"question": "Q?"}', "does not match Question: answer: Field required"),
        ('{"question": "Q?", "answer": 3}', "answer: Input should be a valid string"),
        ("", "empty reply"),
        (None, "empty reply"),
    ],
)
def test_parse_json_reply_is_strict(text, reason):
    parsed, problem = parse_json_reply(text, Question)
    if reason is None:
        assert problem is None and parsed == Question(question="Q?", answer="A.")
    else:
        assert parsed is None and reason in problem


def test_malformed_teacher_output_becomes_a_parse_reason(teacher_server, tmp_path):
    teacher_server.script = ["Sure! Here is a question about refunds."]
    (reply,) = ask_teacher(make_spec(teacher_server, tmp_path), [ask("a")])
    parsed, problem = parse_json_reply(reply.text, Question)
    assert reply.error is None and parsed is None
    assert problem.startswith("not JSON") and "Sure! Here is" in problem
