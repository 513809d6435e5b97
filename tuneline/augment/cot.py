"""Chain-of-thought distillation (`augment.mode: cot`): the teacher answers each seed's question
with step-by-step reasoning, then a final answer.

A round takes the first `per_round` seed questions that have no accepted answer yet (so one
rejected in a round is asked again, with the mistakes, in the next), one request each: the seed's
turns before its last answer, shown to the teacher in the recipe's template as {question}. When
every question has one, the round asks nothing and the rounds stop.
The teacher answers one JSON object `{"reasoning": ..., "answer": ...}`. A reasoning model whose
server returns its thinking in the message's own field (`reasoning_content`, as DeepSeek-R1 and
Qwen3 behind vLLM or SGLang do) may put the final answer alone in the content, and a reply that
opens with a <think>...</think> block is split the same way. The record is the question's turns
and an assistant turn with the final answer in `content` and the reasoning in `reasoning_content`;
the seed's own answer, when it has one, stays in meta as `reference`.

The checks answer a reason (a ledger key) and a detail, like the other modes' checks:
`missing_answer`, `missing_reasoning`, `reasoning_too_short`, `answer_refers_to_reasoning` (the
answer only points at the reasoning, "see above") and `reasoning_in_answer` (the answer repeats
the reasoning or holds a think block, so leaving the reasoning out in training would not).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from tuneline.augment.checks import NO_MISTAKES, AugmentError, RoundRequest, Verdict
from tuneline.augment.teacher import TeacherReply, parse_json_reply
from tuneline.recipe import AugmentChecks, AugmentSpec
from tuneline.records import REASONING, THINK_OPEN, Record, RecordError, make_record, split_think

COT_FORMAT = (
    "Answer with one JSON object and nothing else, in this shape:\n"
    '{"reasoning": "...", "answer": "..."}\n'
    '"reasoning" holds your step-by-step thinking; "answer" holds the final answer alone, complete '
    'without the reasoning (never "see above").'
)
# An answer that only sends the reader to the reasoning: "See above.", "As shown in the reasoning".
POINTER = re.compile(
    r"^\W*(?:see|as|refer|per|check)\b[^\n]{0,60}?\b(?:above|reasoning|explanation|steps)\W*$", re.IGNORECASE
)


class CotReply(BaseModel):
    """The teacher's JSON answer in cot mode."""

    model_config = ConfigDict(extra="forbid")

    reasoning: str = ""
    answer: str = ""


def question_turns(seed: Record, system: str | None) -> list[dict[str, Any]] | None:
    """The turns a seed's last answer replies to (role and content; `system` replaces the seed's
    system prompt when the recipe sets one), or None when there is no user question."""
    messages = seed["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    turns = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not any(m["role"] == "user" and m["content"].strip() for m in turns):
        return None
    if system is not None:
        turns = [{"role": "system", "content": system}] + [m for m in turns if m["role"] != "system"]
    return turns


def question_text(turns: list[dict[str, Any]]) -> str:
    """The question as the teacher reads it: the instructions (system prompt), then the user's
    message, or the whole exchange with speakers named when it has several turns."""
    system = [m["content"] for m in turns if m["role"] == "system"]
    body = [m for m in turns if m["role"] != "system"]
    if len(body) == 1:
        text = body[0]["content"]
    else:
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in body)
    return "\n\n".join([*system, text])


def plan_cot_round(
    spec: AugmentSpec, seeds: list[Record], mistakes: str, round_no: int, answered: set[str]
) -> list[RoundRequest]:
    """One request per question: the first `per_round` seed questions whose seed id is not in
    `answered` (seeds of records accepted in earlier rounds); each request's meta names its seed
    and keeps the seed's answer as `reference`."""
    questions = [(seed, turns) for seed in seeds if (turns := question_turns(seed, spec.system))]
    if not questions:
        raise AugmentError("augment.mode cot: no seed has a user question; check augment.seeds.path")
    questions = [(seed, turns) for seed, turns in questions if seed["id"] not in answered]
    system = f"You solve tasks step by step; your answers teach a smaller model.\n{COT_FORMAT}"
    requests = []
    for seed, turns in questions[: spec.per_round]:
        user = spec.prompt_template().format(
            question=question_text(turns), examples="", document="", n=1,
            mistakes=mistakes or NO_MISTAKES, round=round_no,
        )  # fmt: skip
        meta: dict[str, Any] = {"seed_id": seed["id"]}
        if reference := next(
            (m["content"] for m in seed["messages"][::-1] if m["role"] == "assistant"), None
        ):
            meta["reference"] = reference
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        requests.append(RoundRequest(messages, 1, meta, turns))
    return requests


def split_reply(reply: TeacherReply) -> tuple[str, str] | tuple[None, str]:
    """(reasoning, answer) of a reply, or (None, why it cannot be read)."""
    text = (reply.text or "").strip()
    parsed, problem = parse_json_reply(text, CotReply)
    if isinstance(parsed, CotReply):
        return parsed.reasoning or reply.reasoning or "", parsed.answer
    if reply.reasoning:  # a reasoning model: thinking in the server's field, the answer as content
        return reply.reasoning, text
    thought, answer = split_think(text)
    if thought is not None:
        return thought, answer
    return None, f"{problem}; answer with JSON {{reasoning, answer}}"


def reasoning_problem(reasoning: str, answer: str, checks: AugmentChecks) -> tuple[str, str] | None:
    """Why a reasoning and answer pair cannot teach (reason, detail), or None."""
    if not answer.strip():
        hint = "; the reasoning may conclude one, but the answer field must state it" if reasoning else ""
        return "missing_answer", f"the reply has no final answer (answer is empty){hint}"
    if not reasoning.strip():
        return "missing_reasoning", "the reply has no step-by-step reasoning"
    if len(reasoning.strip()) < checks.min_reasoning_chars:
        length = len(reasoning.strip())
        return "reasoning_too_short", f"reasoning of {length} characters < checks.min_reasoning_chars " + str(
            checks.min_reasoning_chars
        )
    if POINTER.match(answer):
        return (
            "answer_refers_to_reasoning",
            f"answer {answer.strip()!r} points at the reasoning instead of stating it",
        )
    if THINK_OPEN in answer or " ".join(reasoning.split()) in " ".join(answer.split()):
        return "reasoning_in_answer", "the answer repeats the reasoning; it must hold the final answer alone"
    return None


def cot_candidate(
    reply: TeacherReply, request: RoundRequest, checks: AugmentChecks, meta: dict[str, Any]
) -> Verdict:
    """A teacher reply as a record whose last turn carries reasoning_content, or the reason it is not."""
    reasoning, answer = split_reply(reply)
    if reasoning is None:
        return Verdict(None, "parse_error", answer)
    if problem := reasoning_problem(reasoning, answer, checks):
        return Verdict(None, *problem)
    turn = {"role": "assistant", "content": answer.strip(), REASONING: reasoning.strip()}
    try:
        return Verdict(make_record([*(request.turns or []), turn], None, dict(meta)))
    except RecordError as error:
        return Verdict(None, "missing_field", str(error))
