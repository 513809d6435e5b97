"""A loopback OpenAI-compatible chat server for tests and benchmarks, scripted answer by answer.

A real aiohttp server on 127.0.0.1 (port chosen by the OS) in a background thread. It speaks
`POST /v1/chat/completions` (non-streaming, with `usage`) and `GET /v1/models`, and records every
request it receives.

Use it as a context manager or through the `teacher_server` pytest fixture (registered in
tests/conftest.py):

    from openai_server import Reply, openai_server, rate_limited, scripted, server_error

    with openai_server(latency_ms=100) as server:          # default: echo the last user message as JSON
        spec = TeacherSpec(base_url=server.base_url, model="teacher", ...)

    def test_something(teacher_server):                    # the fixture: a fresh server per test
        teacher_server.script = lambda request: '{"answer": "42"}'

The script decides each answer. It is a callable `script(request: Request) -> str | Reply`, or a
list (a queue: the n-th request gets item n; once the list runs out, `then` answers, by default
`echo`). `scripted(*answers, then=echo)` builds that queue as a callable. A queue answers in
ARRIVAL order: with a client concurrency above 1 that is not the order of the requests, so ask
with `concurrency=1` or script by content (`request.user_text`) when answers must match requests.
A `str` answer is the assistant's text with status 200. A `Reply` sets anything else:

    Reply(content="...", status=200, headers={}, delay_ms=None, raw_body=None,
          prompt_tokens=None, completion_tokens=None, finish_reason="stop", model=None,
          reasoning=None)   # reasoning: the message's reasoning_content (a reasoning model's)
    rate_limited(retry_after=1)   -> 429 with a Retry-After header (seconds)
    server_error(status=500)      -> a 5xx with an OpenAI-style error body
    Reply(content="Sure! Here you go")   -> a malformed (non-JSON) answer the parser must reject

`Request` has `index` (0-based arrival order), `body` (the parsed JSON), `headers`, `messages`,
`user_text` (the last user message) and `model`. Token counts default to word counts.

The server object (`TeacherServer`) exposes `base_url` (ends in /v1), `url`, `requests` (every
`Request` received, in arrival order), `count`, `in_flight`, `max_in_flight` (the most requests
it held at once), `latency_ms` (settable), `script` (settable) and `stop()`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@dataclass(frozen=True)
class Request:
    """One chat request as the server received it."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def user_text(self) -> str:
        users = [m.get("content") or "" for m in self.messages if m.get("role") == "user"]
        return str(users[-1]) if users else ""

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


@dataclass(frozen=True)
class Reply:
    """A scripted answer: assistant text with status 200, or an error status, headers, a delay."""

    content: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_ms: float | None = None
    raw_body: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"
    model: str | None = None
    reasoning: str | None = None  # sent as the message's reasoning_content, as reasoning models do


Answer = str | Reply
Script = Callable[[Request], Answer]


def echo(request: Request) -> Answer:
    """The default answer: the last user message echoed back inside a JSON object."""
    return json.dumps({"echo": request.user_text})


def rate_limited(retry_after: float = 1) -> Reply:
    """A 429 that asks the client to wait `retry_after` seconds."""
    return Reply(
        status=429,
        headers={"Retry-After": f"{retry_after:g}"},
        raw_body=json.dumps({"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}),
    )


def server_error(status: int = 500) -> Reply:
    """A server error with an OpenAI-style error body."""
    return Reply(
        status=status,
        raw_body=json.dumps(
            {"error": {"message": f"scripted server error {status}", "type": "server_error"}}
        ),
    )


def scripted(*answers: Answer, then: Script = echo) -> Script:
    """A queue of answers given in arrival order; `then` answers every request after the last one."""
    queue = list(answers)
    lock = threading.Lock()

    def script(request: Request) -> Answer:
        with lock:
            if queue:
                return queue.pop(0)
        return then(request)

    return script


class TeacherServer:
    """The running server: its URL, the requests it received, and knobs tests may turn."""

    def __init__(self, script: Script | Sequence[Answer] | None = None, latency_ms: float = 0) -> None:
        self.script = script
        self.latency_ms = latency_ms
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def script(self) -> Script:
        return self._script

    @script.setter
    def script(self, value: Script | Sequence[Answer] | None) -> None:
        if value is None:
            value = echo
        elif not callable(value):
            value = scripted(*value)
        self._script = value

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def count(self) -> int:
        return len(self.requests)

    def start(self) -> TeacherServer:
        """Start serving in a background thread; returns once the port is bound."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name="openai-test-server", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the loopback OpenAI server did not start within 10 s")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; later requests fail to connect."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # A test that stops the server mid-request must not wait the default 60 s for the handler.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "teacher", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            received = Request(len(self.requests), body, dict(request.headers), time.monotonic())
            self.requests.append(received)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            answer = self.script(received)
            reply = Reply(content=answer) if isinstance(answer, str) else answer
            delay_ms = self.latency_ms if reply.delay_ms is None else reply.delay_ms
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            return _response(received, reply)
        finally:
            with self._lock:
                self.in_flight -= 1


def _response(request: Request, reply: Reply) -> web.Response:
    """The HTTP response for a scripted reply: a chat completion, or the raw body given."""
    if reply.raw_body is not None or reply.status != 200:
        text = reply.raw_body if reply.raw_body is not None else json.dumps({"error": {"message": "error"}})
        return web.Response(
            status=reply.status, text=text, headers=reply.headers, content_type="application/json"
        )
    prompt_words = sum(len(str(m.get("content") or "").split()) for m in request.messages)
    prompt_tokens = prompt_words if reply.prompt_tokens is None else reply.prompt_tokens
    completion_tokens = (
        len(reply.content.split()) if reply.completion_tokens is None else reply.completion_tokens
    )
    completion = {
        "id": f"chatcmpl-{request.index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or request.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": reply.content,
                    **({"reasoning_content": reply.reasoning} if reply.reasoning is not None else {}),
                },
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return web.json_response(completion, status=200, headers=reply.headers)


@contextmanager
def openai_server(
    script: Script | Sequence[Answer] | None = None, *, latency_ms: float = 0
) -> Iterator[TeacherServer]:
    """A running loopback OpenAI server for the `with` block; stopped on the way out."""
    server = TeacherServer(script, latency_ms).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def teacher_server() -> Iterator[TeacherServer]:
    """A fresh loopback OpenAI server per test, echoing by default; set `.script` to script it."""
    with openai_server() as server:
        yield server
