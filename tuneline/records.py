"""The canonical record: every example inside Tuneline is one conversation.

A record is a plain dict (fast to build, to hash and to write as JSON lines):

    {"id": "<content hash>",
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "tool_calls": [{"name": str, "arguments": str}],  # assistant only, optional
                   "reasoning_content": str   # assistant only, optional: step-by-step reasoning
                  }, ...],
     "tools": None | str,          # JSON text of the tool schemas offered to the model
     "meta": {"source": ..., "origin": "collected", ...}}

The id is a digest of the content (messages and tools), never of the meta, so the same
conversation collected twice has the same id and exact dedup is a set lookup.

`reasoning_content` is the field Qwen3/DeepSeek-R1 chat templates and OpenAI-compatible servers use
for a reply's reasoning; `content` then holds the final answer alone. Where a template has no
reasoning support the reasoning is written before the answer in <think>...</think> tags
(`with_think`), and `split_think` takes such a block off a generated reply.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

Record = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
REASONING = "reasoning_content"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A leading think block; an opened block never closed (a reply cut off mid-reasoning) runs to the end.
THINK_BLOCK = re.compile(r"^\s*<think>(.*?)(?:</think>|\Z)", re.DOTALL)


class RecordError(ValueError):
    """A record that cannot be read; the message is the reason that goes to rejects."""


def content_digest(messages: list[dict[str, Any]], tools: str | None) -> str:
    """Digest of what the model sees: same conversation, same id, whatever the meta says."""
    payload = json.dumps([messages, tools], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def make_record(
    messages: list[dict[str, Any]], tools: str | None = None, meta: dict[str, Any] | None = None
) -> Record:
    """Build a canonical record after checking its messages; raises RecordError with the reason."""
    check_messages(messages)
    return {"id": content_digest(messages, tools), "messages": messages, "tools": tools, "meta": meta or {}}


def check_messages(messages: Any) -> None:
    """Reject what no later stage could use: no messages, unknown roles, non-text content."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages: no conversation turns")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{index}]: expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"messages[{index}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise RecordError(
                f"messages[{index}].content: expected text, got {type(message.get('content')).__name__}"
            )
        if REASONING in message:
            _check_reasoning(message, index)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("messages: no assistant turn to learn from")


def record_text(record: Record) -> str:
    """All the text of a record, one turn per line: what length bounds and dedup look at."""
    return "\n".join(m["content"] for m in record["messages"])


def comparable_text(record: Record) -> str:
    """The text two records are compared on: every turn but the system prompt, which many
    records share on purpose and which would make them all look alike."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")


def _check_reasoning(message: dict[str, Any], index: int) -> None:
    """reasoning_content is text, and only an assistant turn reasons."""
    if message["role"] != "assistant":
        raise RecordError(
            f"messages[{index}].{REASONING}: only assistant turns carry reasoning, not {message['role']}"
        )
    if not isinstance(message[REASONING], str):
        raise RecordError(
            f"messages[{index}].{REASONING}: expected text, got {type(message[REASONING]).__name__}"
        )


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, final answer) of a reply that may open with a <think>...</think> block; a reply
    without one is (None, the text). A block never closed leaves no answer."""
    found = THINK_BLOCK.match(text)
    if found is None:
        return None, text
    return found.group(1).strip(), text[found.end() :].strip()


def with_think(reasoning: str, answer: str) -> str:
    """Reasoning and answer as one text, for chat templates without reasoning support."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer}"
