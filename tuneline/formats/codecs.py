"""How each dataset format goes in and out: one JSON object <-> canonical conversations. Pure, no files.

`parse_object` reads one object of a format into conversations and raises `RecordError(reason)`
naming the field of anything unusable. `to_format` turns a canonical record into one object of a
target format and lists what the target cannot hold; a record it cannot represent at all raises
`ConversionError(reason)`. The file layer and the public API are in `tuneline.formats`: import
from there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tuneline.records import Record, RecordError

Message = dict[str, Any]


class Format(StrEnum):
    """The dataset formats Tuneline reads; the values are the words used in recipes and on the CLI."""

    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    OPENAI = "openai"
    PROMPT_COMPLETION = "prompt_completion"
    SELF_INSTRUCT = "self_instruct"
    TEXT = "text"  # documents, not conversations: {"text": ...} objects or a plain .txt/.md file


WRITABLE_FORMATS = (Format.ALPACA, Format.SHAREGPT, Format.OPENAI, Format.PROMPT_COMPLETION)
# sharegpt `from` tags and the canonical role they become; function_call is handled apart.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "observation": "tool",
}  # fmt: skip
# After JSON decoding a valid surrogate pair is one character, so any surrogate left is a lone
# `\ud800`-style escape: text that cannot be written as UTF-8 later.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SHAREGPT_TAGS = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}
# OpenAI's per-message weight has no place in the other formats: say so rather than train on the turn.
WEIGHT_LOST = "weight: {target} cannot hold per-turn weights; turns with weight 0 would be trained on"
REASONING_LOST = "reasoning_content: {target} cannot hold an answer's reasoning; dropped"
TEXT_BESIDE_CALL = "sharegpt function_call turns hold no text; assistant text beside a call dropped"


class ConversionError(ValueError):
    """A record the target format cannot represent at all; the message is the reason."""


@dataclass(frozen=True)
class Conversation:
    """One conversation read from an object, before it becomes a record with meta."""

    messages: list[Message]
    tools: str | None = None
    hint: dict[str, Any] = field(default_factory=dict)  # small meta that lets a writer restore the source


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for reasons a dataset author understands."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_object(obj: dict[str, Any], fmt: Format) -> list[Conversation]:
    """The conversations one object holds (one, or one per instance for self_instruct)."""
    match fmt:
        case Format.ALPACA:
            conversations = [_from_alpaca(obj)]
        case Format.SHAREGPT:
            conversations = [_from_sharegpt(obj)]
        case Format.OPENAI:
            conversations = [_from_openai(obj)]
        case Format.PROMPT_COMPLETION:
            conversations = [_from_prompt_completion(obj)]
        case Format.SELF_INSTRUCT:
            conversations = _from_self_instruct(obj)
        case Format.TEXT:
            raise RecordError("a text object is a document, not a conversation; read it with iter_documents")
    for conversation in conversations:
        _check_unicode(conversation)
    return conversations


def _text(obj: dict[str, Any], key: str, where: str = "", optional: bool = False) -> str:
    """obj[key] as text; optional fields may be missing or null (read as empty)."""
    value = obj.get(key)
    if value is None and optional:
        return ""
    if key not in obj:
        raise RecordError(f"{where}{key}: missing")
    if not isinstance(value, str):
        raise RecordError(f"{where}{key}: expected text, got {json_type(value)}")
    return value


def _join_input(instruction: str, query: str) -> tuple[str, dict[str, Any]]:
    """Alpaca's user turn (instruction, blank line, input) and the hint that splits it again."""
    if not query:
        return instruction, {}
    return f"{instruction}\n\n{query}", {"input_chars": len(query)}


def _from_alpaca(obj: dict[str, Any]) -> Conversation:
    """instruction/input/output with optional system and history [[question, answer], ...]."""
    user, hint = _join_input(_text(obj, "instruction"), _text(obj, "input", optional=True))
    output = _text(obj, "output")
    system = _text(obj, "system", optional=True)
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"history: expected an array of [question, answer] pairs, got {json_type(history)}")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RecordError(
                f"history[{index}]: expected a [question, answer] pair of texts, got {pair!r:.80}"
            )
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Conversation(messages, None, hint)


def _from_self_instruct(obj: dict[str, Any]) -> list[Conversation]:
    """A self-instruct task: one conversation per instance, all sharing the instruction."""
    instruction = _text(obj, "instruction")
    instances = obj.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RecordError(
            f"instances: expected a non-empty array of {{input, output}}, got {instances!r:.80}"
        )
    conversations = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RecordError(f"instances[{index}]: expected an object, got {json_type(instance)}")
        where = f"instances[{index}]."
        user, hint = _join_input(instruction, _text(instance, "input", where, optional=True))
        answer = _text(instance, "output", where)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        conversations.append(Conversation(messages, None, hint))
    return conversations


def _from_prompt_completion(obj: dict[str, Any]) -> Conversation:
    """prompt/completion pairs become one user turn and one assistant turn, text kept verbatim."""
    prompt, completion = _text(obj, "prompt"), _text(obj, "completion")
    return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])


def _tools_text(obj: dict[str, Any]) -> str | None:
    """Tool schemas as JSON text: text is kept as given, a list or object is serialised."""
    tools = obj.get("tools")
    if tools is None or tools in ("", []):
        return None
    if isinstance(tools, str):
        return tools
    if isinstance(tools, list | dict):
        return json.dumps(tools, ensure_ascii=False)
    raise RecordError(f"tools: expected JSON text or an array of tool schemas, got {json_type(tools)}")


def _arguments_text(arguments: Any, where: str) -> str:
    """Tool-call arguments as JSON text of an object; text that already is JSON is kept as given."""
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):
        try:
            if isinstance(json.loads(arguments), dict):
                return arguments
        except json.JSONDecodeError:
            pass
        raise RecordError(f"{where}arguments: expected a JSON object, got text {arguments!r:.60}")
    raise RecordError(f"{where}arguments: expected a JSON object, got {json_type(arguments)}")


def _function_calls(value: str, where: str) -> list[dict[str, str]]:
    """A function_call turn's value: JSON text of {name, arguments}, or an array of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise RecordError(
            f"{where}value: function_call is not JSON ({error.msg}, column {error.colno}): {value!r:.60}"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise RecordError(f"{where}value: function_call holds an empty array of calls")
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            raise RecordError(f"{where}value: function_call must be {{name, arguments}}, got {call!r:.60}")
    return [{"name": call["name"], "arguments": _arguments_text(call["arguments"], where)} for call in calls]


def _sharegpt_turn(turn: Any, where: str) -> Message:
    """One {from, value} turn (or {role, content}) as a canonical message."""
    if not isinstance(turn, dict):
        raise RecordError(f"{where}: expected an object, got {json_type(turn)}")
    tag_key, value_key = ("from", "value") if "from" in turn else ("role", "content")
    tag, value = turn.get(tag_key), _text(turn, value_key, f"{where}.")
    if tag == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _function_calls(value, f"{where}.")}
    if tag not in SHAREGPT_ROLES:
        known = ", ".join([*SHAREGPT_ROLES, "function_call"])
        raise RecordError(f"{where}.{tag_key}: {tag!r} is not one of {known}")
    return _with_reasoning({"role": SHAREGPT_ROLES[tag], "content": value}, turn, where)


def _with_reasoning(message: Message, source: dict[str, Any], where: str) -> Message:
    """An assistant turn keeps the `reasoning_content` its source carries (reasoning before the answer)."""
    reasoning = source.get("reasoning_content")
    if reasoning is None:
        return message
    if not isinstance(reasoning, str) or message["role"] != "assistant":
        what = json_type(reasoning) if not isinstance(reasoning, str) else f"a {message['role']} turn"
        raise RecordError(f"{where}.reasoning_content: expected text on an assistant turn, got {what}")
    return {**message, "reasoning_content": reasoning}


def _from_sharegpt(obj: dict[str, Any]) -> Conversation:
    """LLaMA-Factory sharegpt: conversations of {from, value}, top-level system and tools."""
    key = "conversations" if "conversations" in obj else "messages"
    turns = obj.get(key)
    if not isinstance(turns, list):
        raise RecordError(f"{key}: expected an array of turns, got {json_type(turns)}")
    system = _text(obj, "system", optional=True)
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages += [_sharegpt_turn(turn, f"{key}[{index}]") for index, turn in enumerate(turns)]
    return Conversation(messages, _tools_text(obj))


def _openai_content(message: dict[str, Any], where: str) -> str:
    """Message content: text, null (tool-call turns) or an array of text parts, joined."""
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        return ""
    if isinstance(content, list):
        return "".join(_text_part(part, f"{where}.content[{index}]") for index, part in enumerate(content))
    return _text(message, "content", f"{where}.")


def _text_part(part: Any, where: str) -> str:
    """The text of one content part `{"type": "text", "text": ...}`; anything else names what is wrong."""
    if not isinstance(part, dict):
        raise RecordError(f"{where}: expected a part {{type: text, text: ...}}, got {json_type(part)}")
    if part.get("type") != "text":
        raise RecordError(f"{where}: only text parts are supported, got {part.get('type')!r}")
    if "text" not in part:
        others = [key for key in part if key != "type" and isinstance(part[key], str)]
        fix = f'rename "{others[0]}" to "text"' if others else 'add "text" with the part\'s text'
        seen = ", ".join(sorted(part)) or "no keys"
        raise RecordError(f'{where}: a text part holds its text in "text"; this one has [{seen}]; {fix}')
    return _text(part, "text", f"{where}.")


def _openai_message(message: Any, where: str) -> Message:
    """One OpenAI chat message; tool_calls in OpenAI shape become canonical {name, arguments}."""
    if not isinstance(message, dict):
        raise RecordError(f"{where}: expected an object, got {json_type(message)}")
    result: Message = {"role": message.get("role"), "content": _openai_content(message, where)}
    if "weight" in message:
        result["weight"] = _weight(message, where)
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise RecordError(f"{where}.tool_calls: expected an array, got {json_type(calls)}")
        result["tool_calls"] = []
        for index, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                raise RecordError(
                    f"{where}.tool_calls[{index}]: expected {{type, function: {{name, arguments}}}}"
                )
            arguments = _arguments_text(function.get("arguments", "{}"), f"{where}.tool_calls[{index}].")
            result["tool_calls"].append({"name": function["name"], "arguments": arguments})
    return _with_reasoning(result, message, where)


def _weight(message: dict[str, Any], where: str) -> int:
    """OpenAI's per-message `weight`: 0 (do not learn from this assistant turn) or 1 (learn)."""
    weight = message["weight"]
    if message.get("role") != "assistant":
        raise RecordError(f"{where}.weight: only assistant messages carry a weight; remove it from this one")
    if weight not in (0, 1) or isinstance(weight, bool):
        raise RecordError(f"{where}.weight: expected 0 (do not learn from this turn) or 1, got {weight!r}")
    return int(weight)


def _from_openai(obj: dict[str, Any]) -> Conversation:
    """OpenAI chat fine-tuning lines: messages with optional tool_calls and tools."""
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise RecordError(f"messages: expected an array of messages, got {json_type(messages)}")
    parsed = [_openai_message(message, f"messages[{index}]") for index, message in enumerate(messages)]
    return Conversation(parsed, _tools_text(obj))


def _check_unicode(conversation: Conversation) -> None:
    """Reject lone surrogate escapes (e.g. "\\ud800"): no UTF-8 writer could store them."""
    text = json.dumps([conversation.messages, conversation.tools], ensure_ascii=False)
    if not text.isascii() and (found := LONE_SURROGATE.search(text)):
        raise RecordError(f"text holds a lone surrogate {found.group()!r}, which is not valid Unicode")


def to_format(record: Record, target: str) -> tuple[dict[str, Any], list[str]]:
    """A canonical record as one object of `target`, with what the target could not hold.

    Raises ConversionError when the record cannot be represented at all (it is then reported as
    not converted, never dropped silently). Losses are short reasons shared by all records, so a
    caller can count them.
    """
    match target:
        case "alpaca":
            return _to_alpaca(record)
        case "sharegpt":
            return _to_sharegpt(record)
        case "openai":
            return _to_openai(record)
        case "prompt_completion":
            return _to_prompt_completion(record)
    raise ConversionError(f"no writer for {target!r}; write alpaca, sharegpt, openai or prompt_completion")


def _split_system(messages: list[Message], target: str) -> tuple[str, list[Message]]:
    """The leading system prompt and the turns after it; later system turns cannot be held."""
    system, body = "", messages
    if messages and messages[0]["role"] == "system":
        system, body = messages[0]["content"], messages[1:]
    if any(message["role"] == "system" for message in body):
        raise ConversionError(f"{target} holds one system prompt, at the start; this record has another")
    return system, body


def _weight_losses(record: Record, target: str) -> list[str]:
    """The loss of per-turn weights in a target without them, when a turn says not to learn from it."""
    if any(message.get("weight") == 0 for message in record["messages"]):
        return [WEIGHT_LOST.format(target=target)]
    return []


def _split_input(user: str, input_chars: Any) -> tuple[str, str]:
    """Alpaca instruction and input from a user turn, using the `input_chars` hint the reader left.

    Without the hint (or when it no longer fits the text) everything goes to `instruction`: the
    model sees the same prompt either way.
    """
    if isinstance(input_chars, int) and input_chars > 0 and len(user) >= input_chars + 2:
        cut = len(user) - input_chars
        if user[cut - 2 : cut] == "\n\n":
            return user[: cut - 2], user[cut:]
    return user, ""


def _to_alpaca(record: Record) -> tuple[dict[str, Any], list[str]]:
    """instruction/input/output (+ system, history); needs plain alternating user/assistant turns."""
    system, body = _split_system(record["messages"], "alpaca")
    if any(message["role"] == "tool" or message.get("tool_calls") for message in body):
        raise ConversionError("alpaca cannot hold tool calls or tool results")
    losses = ["tools: alpaca cannot hold tool schemas; dropped"] if record.get("tools") else []
    losses += _reasoning_losses(record, "alpaca")
    losses += _weight_losses(record, "alpaca")
    answers = [index for index, message in enumerate(body) if message["role"] == "assistant"]
    if answers and answers[-1] < len(body) - 1:
        losses.append("alpaca ends on the answer; turns after the last assistant turn dropped")
        body = body[: answers[-1] + 1]
    if not body or [message["role"] for message in body] != ["user", "assistant"] * (len(body) // 2):
        raise ConversionError("alpaca needs user/assistant turns that alternate, starting with user")
    pairs = [[body[index]["content"], body[index + 1]["content"]] for index in range(0, len(body), 2)]
    *history, (question, answer) = pairs
    instruction, query = _split_input(question, record.get("meta", {}).get("input_chars"))
    result: dict[str, Any] = {"instruction": instruction, "input": query, "output": answer}
    if system:
        result["system"] = system
    if history:
        result["history"] = history
    return result, losses


def _reasoning_losses(record: Record, target: str) -> list[str]:
    """The loss to report when a record's reasoning has no place in `target` (once per record)."""
    if any("reasoning_content" in message for message in record["messages"]):
        return [REASONING_LOST.format(target=target)]
    return []


def _call_value(calls: list[dict[str, str]], losses: list[str]) -> str:
    """A sharegpt function_call value: JSON text of {name, arguments}, or an array for several."""
    items = []
    for call in calls:
        try:
            arguments = json.loads(call["arguments"])
        except json.JSONDecodeError:
            losses.append("tool call arguments are not JSON; written as text")
            arguments = call["arguments"]
        items.append({"name": call["name"], "arguments": arguments})
    return json.dumps(items[0] if len(items) == 1 else items, ensure_ascii=False)


def _to_sharegpt(record: Record) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory sharegpt: conversations of {from, value}, system and tools at the top."""
    system, body = _split_system(record["messages"], "sharegpt")
    losses = _weight_losses(record, "sharegpt")
    conversations = []
    for message in body:
        if message.get("tool_calls"):
            if message["content"]:
                losses.append(TEXT_BESIDE_CALL)
            value = _call_value(message["tool_calls"], losses)
            conversations.append({"from": "function_call", "value": value})
        else:
            conversations.append({"from": SHAREGPT_TAGS[message["role"]], "value": message["content"]})
        if "reasoning_content" in message:
            conversations[-1]["reasoning_content"] = message["reasoning_content"]
    result: dict[str, Any] = {"conversations": conversations}
    if system:
        result["system"] = system
    tools = _tool_schemas(record.get("tools"), losses)
    if tools is not None:
        unwrapped = [tool["function"] if _is_wrapped(tool) else tool for tool in tools]
        # Keep the text as given when nothing changes: a sharegpt round trip stays byte-exact.
        result["tools"] = record["tools"] if unwrapped == tools else json.dumps(unwrapped, ensure_ascii=False)
    return result, losses


def _to_openai(record: Record) -> tuple[dict[str, Any], list[str]]:
    """OpenAI chat fine-tuning shape; tool calls get ids `call_N` that the tool turns answer in order."""
    messages: list[dict[str, Any]] = []
    issued, pending = 0, []
    for message in record["messages"]:
        item: dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if "reasoning_content" in message:
            item["reasoning_content"] = message["reasoning_content"]
        if "weight" in message:
            item["weight"] = message["weight"]
        if message.get("tool_calls"):
            item["tool_calls"] = []
            for call in message["tool_calls"]:
                item["tool_calls"].append(
                    {"id": f"call_{issued}", "type": "function", "function": dict(call)}
                )
                pending.append(f"call_{issued}")
                issued += 1
        if message["role"] == "tool" and pending:
            item["tool_call_id"] = pending.pop(0)
        messages.append(item)
    losses: list[str] = []
    result: dict[str, Any] = {"messages": messages}
    tools = _tool_schemas(record.get("tools"), losses)
    if tools is not None:
        result["tools"] = [
            tool if _is_wrapped(tool) else {"type": "function", "function": tool} for tool in tools
        ]
    return result, losses


def _to_prompt_completion(record: Record) -> tuple[dict[str, Any], list[str]]:
    """One user turn and one answer; a system prompt or tool schemas are dropped and reported."""
    system, body = _split_system(record["messages"], "prompt_completion")
    losses = ["system: prompt_completion has no place for a system prompt; dropped"] if system else []
    if record.get("tools"):
        losses.append("tools: prompt_completion cannot hold tool schemas; dropped")
    losses += _reasoning_losses(record, "prompt_completion")
    losses += _weight_losses(record, "prompt_completion")
    if [message["role"] for message in body] != ["user", "assistant"] or body[1].get("tool_calls"):
        raise ConversionError(
            f"prompt_completion holds one user turn and one answer; this record has {len(body)} turns"
        )
    return {"prompt": body[0]["content"], "completion": body[1]["content"]}, losses


def _tool_schemas(tools: str | None, losses: list[str]) -> list[Any] | None:
    """The tool schemas of a record as a list, or None; text that is not JSON is dropped and reported."""
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        losses.append("tools: not JSON text; dropped")
        return None
    return parsed if isinstance(parsed, list) else [parsed]


def _is_wrapped(tool: Any) -> bool:
    """Whether a tool schema is in OpenAI's {type: function, function: {...}} shape."""
    return (
        isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
    )
