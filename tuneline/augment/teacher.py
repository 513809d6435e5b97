"""The teacher client: chat requests to any OpenAI-compatible endpoint, recorded and replayable.

`ask_teacher` sends a batch of conversations with bounded concurrency (an asyncio semaphore around
one `AsyncOpenAI` client, which retries 429 and 5xx with backoff, honours Retry-After and applies
the timeout) and returns one `TeacherReply` per conversation, in order. A request that still fails
is an error reply, not an exception, so one bad request does not sink a round. When every
request failed, the batch raises: `TeacherUnreachable` when each failure is worth retrying
(network, timeout, 429, 5xx; the tasks layer retries the task), `TeacherError` when the endpoint
refused them (a key, model or setting to fix).

Record and replay: each exchange is one JSON file named by its request digest (model, messages,
sampling settings) in `spec.recordings`, written atomically. `record` serves what is recorded and
asks (and records) the rest; `replay` never touches the network and names the first request that
has no recording; `live` neither reads nor writes recordings. Failed replies are never recorded.
Identical conversations in one batch are numbered (`sample` 0, 1, ...), so asking the same prompt
five times records five answers and replays them in the same order. The same request in a later
call is served the same recorded answer: vary the request (e.g. the round in the prompt) to get
fresh ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic

from tuneline.errors import UserError
from tuneline.recipe import TeacherSpec

__all__ = [
    "TeacherError",
    "TeacherReply",
    "TeacherUnreachable",
    "ask_teacher",
    "parse_json_reply",
    "request_digest",
    "resolve_api_key",
]

# Local endpoints (vLLM, Ollama, the test server) need no key, but the client insists on one.
NO_KEY = "no-key"


class TeacherError(UserError):
    """A teacher setting or recording that must be fixed: a replay miss, a refused key, an unknown model."""


class TeacherUnreachable(Exception):
    """Every request failed on network errors, timeouts, 429 or 5xx after the retries: try again later."""


@dataclass(frozen=True)
class TeacherReply:
    """One answer: the reply text, or why there is none (`error`), with its token counts.

    `recorded` is true when the reply was served from a recording (no tokens were spent on it now).
    `reasoning` is the server's own reasoning field (`reasoning_content`, or `reasoning`), which
    reasoning models served by vLLM, SGLang or DeepSeek's API return beside the answer.
    """

    request_digest: str
    text: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    recorded: bool
    reasoning: str | None = None


@dataclass(frozen=True)
class _Failure:
    """A request that failed for good; `transient` failures are the ones a later retry may cure."""

    message: str
    transient: bool


def request_digest(spec: TeacherSpec, messages: list[dict[str, Any]], sample: int = 0) -> str:
    """sha256 of the canonical request: model, messages, sampling settings and the sample number.

    The endpoint URL, key, concurrency and retries are left out: they do not change the answer,
    so a recording made against one server replays for another serving the same model.
    """
    request = _request_body(spec, messages)
    request["sample"] = sample
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_api_key(spec: TeacherSpec, api_key: str | None = None) -> str:
    """The key to send: the one given (the tasks layer passes a Prefect Secret's value), else the
    environment variable named by `spec.api_key_env`, else a placeholder for endpoints without keys."""
    if api_key:
        return api_key
    return os.environ.get(spec.api_key_env) or NO_KEY


def ask_teacher(
    spec: TeacherSpec, conversations: list[list[dict[str, Any]]], *, api_key: str | None = None
) -> list[TeacherReply]:
    """Ask the teacher to continue each conversation; one reply per conversation, in order.

    Raises TeacherError on a replay miss, a refused key, an unknown model or URL, or when the
    endpoint refused every request; TeacherUnreachable when every request failed on errors worth
    retrying (network, timeout, 429, 5xx). Some failed requests alone are error replies.
    """
    digests = _digests(spec, conversations)
    recordings_dir = Path(spec.recordings)
    replies: dict[int, TeacherReply] = {}
    if spec.mode != "live":
        for index, digest in enumerate(digests):
            recorded = _read_recording(recordings_dir, digest)
            if recorded is not None:
                replies[index] = recorded
    missing = [index for index in range(len(conversations)) if index not in replies]
    if missing and spec.mode == "replay":
        raise _replay_miss(spec, conversations, digests, missing)
    if missing:
        asked = _run_async(_ask_all(spec, conversations, digests, missing, resolve_api_key(spec, api_key)))
        replies.update({index: reply for index, (reply, _) in asked.items()})
        if all(reply.error is not None for reply, _ in asked.values()):
            first = asked[missing[0]][0]
            failed = f"teacher {spec.model} at {spec.base_url}: all {len(missing)} request(s) failed"
            if all(transient for _, transient in asked.values()):
                raise TeacherUnreachable(f"{failed}; the first: {first.error}")
            # Every request refused alike is a setting, not bad luck: stop instead of an empty round.
            raise TeacherError(
                f"{failed}; the first: {first.error}. Check teacher.model, teacher.max_tokens and "
                "teacher.json_mode (not every server accepts response_format json_object)"
            )
    return [replies[index] for index in range(len(conversations))]


def parse_json_reply(
    text: str | None, schema: type[pydantic.BaseModel]
) -> tuple[pydantic.BaseModel | None, str | None]:
    """Parse a reply strictly: one JSON value (a ```json fence around it tolerated) valid under the
    schema. Returns (the model, None), or (None, the reason) that a rejected candidate keeps."""
    if text is None or not text.strip():
        return None, "empty reply"
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?[ \t]*\n(.*?)\n?```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        start = body[:40].replace("\n", " ")
        return None, f"not JSON ({error.msg} at line {error.lineno} column {error.colno}): starts {start!r}"
    try:
        return schema.model_validate(value), None
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(reply)"
            problems.append(f"{where}: {item['msg']}")
        return None, f"does not match {schema.__name__}: " + "; ".join(problems)


# ---------------------------------------------------------------- requests


def _request_body(spec: TeacherSpec, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of a chat request that decide the answer (and go into its digest)."""
    return {
        "model": spec.model,
        "messages": messages,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
        "seed": spec.seed,
        "json_mode": spec.json_mode,
    }


def _digests(spec: TeacherSpec, conversations: list[list[dict[str, Any]]]) -> list[str]:
    """Each conversation's digest; repeats of one conversation count up their sample number."""
    seen: Counter[str] = Counter()
    digests = []
    for messages in conversations:
        first = request_digest(spec, messages)
        digests.append(request_digest(spec, messages, sample=seen[first]))
        seen[first] += 1
    return digests


def _run_async(coroutine: Any) -> Any:
    """Run a coroutine to completion, also from code that already runs inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _ask_all(
    spec: TeacherSpec,
    conversations: list[list[dict[str, Any]]],
    digests: list[str],
    indices: list[int],
    api_key: str,
) -> dict[int, tuple[TeacherReply, bool]]:
    """Send the listed requests, at most `spec.concurrency` at a time, recording each success.

    Returns each index's reply and whether its failure (if any) is worth retrying later.
    """
    import openai  # ~1-2 s to import: only runs that actually ask pay for it (not replay, not the CLI)

    semaphore = asyncio.Semaphore(spec.concurrency)
    async with openai.AsyncOpenAI(
        base_url=spec.base_url, api_key=api_key, max_retries=spec.max_retries, timeout=spec.timeout_s
    ) as client:

        async def one(index: int) -> tuple[TeacherReply, bool]:
            async with semaphore:
                return await _ask_one(client, spec, conversations[index], digests[index])

        try:
            async with asyncio.TaskGroup() as group:
                tasks = {index: group.create_task(one(index)) for index in indices}
        except* TeacherError as errors:
            # A refused key or unknown model fails every request alike: report it once.
            raise errors.exceptions[0] from None
    return {index: task.result() for index, task in tasks.items()}


async def _ask_one(
    client: Any, spec: TeacherSpec, messages: list[dict[str, Any]], digest: str
) -> tuple[TeacherReply, bool]:
    """One chat completion (the client retries it); a success is recorded in `record` mode.

    Returns the reply and whether a failure is transient. Settings that fail every request
    (a refused key, an unknown model or URL) raise TeacherError.
    """
    import openai
    from openai.types.chat import ChatCompletion

    body: dict[str, Any] = {
        "model": spec.model,
        "messages": messages,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
    }
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.json_mode:
        body["response_format"] = {"type": "json_object"}
    try:
        # The client's plain `post` (its retries, backoff and timeout included) sends the body as
        # built here; `chat.completions.create` would re-walk it against the SDK's typed schema,
        # which costs ~2 ms of CPU a request and shows at concurrency 8 on a small machine.
        response = await client.post("/chat/completions", body=body, cast_to=ChatCompletion)
    except openai.APITimeoutError:
        return _failed(digest, f"timed out after {spec.timeout_s:g} s, {spec.max_retries} retries"), True
    except openai.APIConnectionError as error:
        return _failed(digest, f"connection to {spec.base_url} failed: {error.__cause__ or error}"), True
    except openai.APIStatusError as error:
        message, transient = _status_failure(spec, error)
        return _failed(digest, message), transient
    usage = response.usage
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    choice = response.choices[0] if response.choices else None
    text = choice.message.content if choice else None
    reasoning = _server_reasoning(choice.message) if choice else None
    problem = None
    if not text:
        problem = "empty reply"
    elif choice.finish_reason == "length":
        problem = f"reply cut off at max_tokens={spec.max_tokens}; raise teacher.max_tokens"
    if problem is None and spec.mode == "record":
        recording = {
            "digest": digest,
            "request": _request_body(spec, messages),
            "text": text,
            **({"reasoning": reasoning} if reasoning else {}),
            "model": response.model,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_recording(Path(spec.recordings), digest, recording)
    reply = TeacherReply(
        digest, text or None, problem, prompt_tokens, completion_tokens, recorded=False, reasoning=reasoning
    )
    return reply, False


def _server_reasoning(message: Any) -> str | None:
    """The reasoning a server returned beside the answer (extra fields the SDK keeps), if any."""
    for name in ("reasoning_content", "reasoning"):
        value = getattr(message, name, None)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _status_failure(spec: TeacherSpec, error: Any) -> tuple[str, bool]:
    """An HTTP error left after the client's retries, as (message, transient).

    A refused key or a missing model fails every request alike, so it raises TeacherError.
    """
    status = error.status_code
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    detail = _short(str(message or error.message))
    if status in (401, 403):
        raise TeacherError(
            f"teacher at {spec.base_url} refused the API key (HTTP {status}: {detail}); put a valid key in "
            f"the environment variable {spec.api_key_env} (teacher.api_key_env) or name a Prefect Secret "
            "block in teacher.api_key_secret"
        )
    if status == 404:
        raise TeacherError(
            f"teacher at {spec.base_url} has no model {spec.model!r} or no chat endpoint (HTTP 404: "
            f"{detail}); check teacher.model and teacher.base_url (it usually ends in /v1)"
        )
    transient = status in (408, 409, 429) or status >= 500
    retried = f" after {spec.max_retries} retries" if transient else ""
    return f"HTTP {status}{retried}: {detail}", transient


def _failed(digest: str, message: str) -> TeacherReply:
    return TeacherReply(digest, None, message, 0, 0, recorded=False)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- recordings


def _recording_path(recordings_dir: Path, digest: str) -> Path:
    return recordings_dir / f"{digest}.json"


def _read_recording(recordings_dir: Path, digest: str) -> TeacherReply | None:
    """The recorded reply for a digest, or None when there is none."""
    path = _recording_path(recordings_dir, digest)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        usage = data.get("usage") or {}
        return TeacherReply(
            digest,
            str(data["text"]),
            None,
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            recorded=True,
            reasoning=str(data["reasoning"]) if data.get("reasoning") else None,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TeacherError(
            f"{path}: unreadable teacher recording ({type(error).__name__}: {error}); delete the file "
            "and run with teacher.mode=record to record that exchange again"
        ) from None


def _write_recording(recordings_dir: Path, digest: str, recording: dict[str, Any]) -> None:
    """Write one exchange atomically: a temporary file renamed into place, never a half file."""
    recordings_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(recording, ensure_ascii=False, indent=1)
    handle, temp_name = tempfile.mkstemp(prefix=f".{digest[:12]}-", suffix=".tmp", dir=recordings_dir)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp_name, _recording_path(recordings_dir, digest))
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _replay_miss(
    spec: TeacherSpec, conversations: list[list[dict[str, Any]]], digests: list[str], missing: list[int]
) -> TeacherError:
    """The error for replay mode with requests that were never recorded: names the first one."""
    first = missing[0]
    user_turns = [m.get("content") for m in conversations[first] if m.get("role") == "user"]
    words = " ".join(str(user_turns[-1] if user_turns else "").split()[:12])
    return TeacherError(
        f"teacher.mode=replay: {len(missing)} of {len(conversations)} request(s) have no recording in "
        f"{spec.recordings}; the first is request {digests[first][:16]} (user message: {words!r}...). "
        "Run once with teacher.mode=record (the teacher must be reachable) to record them"
    )
