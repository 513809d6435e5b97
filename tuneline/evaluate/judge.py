"""The judge stage: an LLM judge says which reply is better, the tuned model's or its opponent's
(the base model, and the champion when the evaluate stage scored one), on the test examples of
the evaluate stage's `predictions.jsonl`. It also decides the test suites' `rubric` assertions.

Position bias: judges favour the reply they read first (or second). So each pair is asked twice,
the tuned reply as A and then as B, and the two verdicts are combined: both name the same reply,
it wins; they disagree, a tie, counted as position-inconsistent; an order without a usable
verdict (an answer that is not the JSON asked for, or a request the endpoint refused) leaves the
pair without a verdict, with the reason. Identical replies are a tie without asking.

Files: `verdicts.jsonl`, one row per example, opponent and order (which model was A and B, the
judge's raw winner and reason, what went wrong); `judgments.jsonl`, one row per judged example
(per opponent the combined winner: tuned, the opponent's name, tie, or null). Stats: per opponent
wins, losses and ties from the tuned model's side, `win_rate = (wins + ties / 2) / judged` and
`position_consistency` (the share of pairs whose two orders agreed).

Requests go through the teacher client (tuneline.augment.teacher): record/replay, concurrency,
retries. A request still failing on the network, a timeout, 429 or 5xx fails the stage with
TeacherUnreachable (the task retries; in record mode what was answered is served from the
recordings): a verdict is never guessed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from tuneline.augment.teacher import (
    TeacherError,
    TeacherReply,
    TeacherUnreachable,
    ask_teacher,
    parse_json_reply,
)
from tuneline.errors import UserError
from tuneline.pipeline import JUDGE, judge_key
from tuneline.recipe import DEFAULT_RUBRIC, JudgeSpec
from tuneline.store import StageRef, StageWriter, iter_records, reuse_or_write

PREDICTIONS = "predictions.jsonl"
VERDICTS = "verdicts.jsonl"
JUDGMENTS = "judgments.jsonl"
# (tuned model's letter, opponent's letter) in the two orders each pair is asked in.
ORDERS = {"AB": ("A", "B"), "BA": ("B", "A")}
# Failures the teacher client gives up on that a later try may cure (its messages for timeouts,
# refused connections and 408/409/429/5xx after its retries); others (a 400, a reply cut off at
# max_tokens) are answers about that request: the pair gets no verdict, with the reason.
TRANSIENT = re.compile(r"^(timed out after|connection to |HTTP \d+ after \d+ retries)")

PAIRWISE_SYSTEM = """You are an impartial judge. Two assistant replies, A and B, answer the same \
conversation. Decide which reply is better according to this rubric:

{rubric}

The replies are shown in random order: do not let their position, their length or their style \
sway you. Answer with one JSON object and nothing else:
{{"winner": "A" or "B" or "tie", "reason": "one or two sentences"}}"""

RUBRIC_SYSTEM = """You are a strict grader. Decide whether the assistant's reply to the conversation \
satisfies this criterion:

{criterion}

Answer with one JSON object and nothing else:
{{"satisfied": "yes" or "no", "reason": "one sentence"}}"""

# The callable suites.run_checks takes: (rubric, conversation turns, reply) items in, (passed, why) out.
RubricItem = tuple[str, list[dict[str, Any]], str]
RubricJudge = Callable[[list[RubricItem]], list[tuple[bool | None, str]]]


class JudgeError(UserError):
    """A judge setting or file to fix: the message names the recipe field under evaluate.judge."""


class PairVerdict(BaseModel):
    """The judge's answer about one ordered pair; the winner's spelling is forgiven ("a", "Tie")."""

    model_config = ConfigDict(extra="ignore")

    winner: Literal["A", "B", "tie"]
    reason: str = ""

    @field_validator("winner", mode="before")
    @classmethod
    def _spelling(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().strip(".\"'").casefold().removeprefix("reply ").strip()
            return {"a": "A", "b": "B", "tie": "tie", "draw": "tie"}.get(word, value)
        return value


class RubricVerdict(BaseModel):
    """The judge's answer about one reply and one criterion."""

    model_config = ConfigDict(extra="ignore")

    satisfied: bool
    reason: str = ""

    @field_validator("satisfied", mode="before")
    @classmethod
    def _yes_no(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().strip(".").casefold()
            return {"yes": True, "pass": True, "no": False, "fail": False}.get(word, value)
        return value


# ---------------------------------------------------------------- the stage


def run_judge(
    artifacts_dir: str | Path, evaluated: StageRef, spec: JudgeSpec, *, api_key: str | None = None
) -> StageRef:
    """Judge the tuned model against each opponent on the evaluated examples, both orders; cached on
    the evaluate stage, the verdict settings, the rubric and the code (a second run asks nothing)."""
    digest = judge_key(spec, evaluated)

    def write(writer: StageWriter) -> None:
        rubric = load_rubric(spec)
        rows = list(iter_records(evaluated, PREDICTIONS)) if evaluated.file(PREDICTIONS).is_file() else []
        writer.count_in(len(rows))
        limit = spec.max_examples or len(rows)
        for row in rows[limit:]:
            writer.drop({"id": row["id"]}, "beyond_max_examples", f"evaluate.judge.max_examples is {limit}")
        rows = rows[:limit]
        opponents, skipped = available_opponents(spec, rows)
        verdicts, replies = ask_pairs(spec, rubric, rows, opponents, api_key)
        with writer.path(VERDICTS).open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(verdict, ensure_ascii=False) + "\n" for verdict in verdicts.values())
        results: dict[str, list[dict[str, Any]]] = {opponent: [] for opponent in opponents}
        for row in rows:
            pairs = {
                opponent: combine(
                    verdicts.get((row["id"], opponent, "AB")), verdicts.get((row["id"], opponent, "BA"))
                )
                for opponent in opponents
            }
            writer.keep({"id": row["id"], "pairs": pairs}, JUDGMENTS)
            for opponent, result in pairs.items():
                results[opponent].append(result)
        writer.stats = {
            "judge_model": spec.endpoint.model,
            "rubric": rubric,
            "examples": len(rows),
            "pairs": {opponent: pair_stats(results[opponent]) for opponent in opponents},
            "skipped": skipped,
            "requests": request_stats(replies),
        }

    return reuse_or_write(artifacts_dir, JUDGE, digest, write, [evaluated])


def load_rubric(spec: JudgeSpec) -> str:
    """The rubric text: `rubric`, the content of `rubric_file`, or the default."""
    if spec.rubric_file is None:
        return spec.rubric or DEFAULT_RUBRIC
    try:
        text = Path(spec.rubric_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise JudgeError(
            f"evaluate.judge.rubric_file: cannot read {spec.rubric_file} ({error}); paths are relative to "
            f"the project folder ({Path.cwd()}): fix the path or write the rubric in evaluate.judge.rubric"
        ) from None
    if not text:
        raise JudgeError(f"evaluate.judge.rubric_file: {spec.rubric_file} is empty; write the rubric in it")
    return text


def available_opponents(spec: JudgeSpec, rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The opponents in `spec.pairs` whose replies every row has, and why any other was skipped."""
    opponents, skipped = [], {}
    for opponent in spec.pairs:
        if rows and all(isinstance(row.get(opponent), str) for row in rows):
            opponents.append(opponent)
        elif opponent == "champion":
            skipped[opponent] = "the evaluate stage scored no champion (the registry had none when it ran)"
        else:
            skipped[opponent] = f"predictions.jsonl has no {opponent} replies to compare with"
    return opponents, skipped


def ask_pairs(
    spec: JudgeSpec, rubric: str, rows: list[dict[str, Any]], opponents: list[str], api_key: str | None
) -> tuple[dict[tuple[Any, str, str], dict[str, Any]], list[TeacherReply]]:
    """Ask every (example, opponent) pair whose replies differ in both orders, in one batch; returns
    the verdict rows by (id, opponent, order) and the judge's replies."""
    jobs = [
        (row, opponent, order)
        for row in rows
        for opponent in opponents
        if row[opponent] != row["tuned"]
        for order in ORDERS
    ]
    conversations = [
        pair_messages(rubric, row, opponent, order, spec.show_reference) for row, opponent, order in jobs
    ]
    replies = ask_judge(spec, conversations, api_key) if conversations else []
    verdicts = {
        (row["id"], opponent, order): verdict_row(row["id"], opponent, order, reply)
        for (row, opponent, order), reply in zip(jobs, replies, strict=True)
    }
    return verdicts, replies


def render_turns(turns: list[dict[str, Any]]) -> str:
    """A conversation as the judge reads it: each turn under its role."""
    return "\n\n".join(f"[{turn.get('role', 'user')}]\n{turn.get('content') or ''}" for turn in turns)


def pair_messages(
    rubric: str, row: dict[str, Any], opponent: str, order: str, show_reference: bool
) -> list[dict[str, str]]:
    """The request for one ordered pair: the rubric, the conversation, the reference, A and B."""
    tuned_letter, _ = ORDERS[order]
    a, b = (row["tuned"], row[opponent]) if tuned_letter == "A" else (row[opponent], row["tuned"])
    parts = [f"<conversation>\n{render_turns(row.get('prompt') or [])}\n</conversation>"]
    if show_reference and row.get("reference"):
        parts.append(f"<reference_answer>\n{row['reference']}\n</reference_answer>")
    parts += [f"<reply_A>\n{a}\n</reply_A>", f"<reply_B>\n{b}\n</reply_B>"]
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM.format(rubric=rubric)},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_answer(text: str | None, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    """The judge's JSON answer: strict first (tuneline.augment.teacher), else the first JSON object
    inside the text (judges often write a sentence around it). (answer, None) or (None, why not)."""
    answer, problem = parse_json_reply(text, schema)
    if answer is not None or not text:
        return answer, problem
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
            return schema.model_validate(value), None
        except ValueError:  # not JSON here, or JSON of the wrong shape: try the next brace
            continue
    return None, problem


def verdict_row(record_id: Any, opponent: str, order: str, reply: TeacherReply) -> dict[str, Any]:
    """One ordered pair's verdict as stored: who was A and B, the raw winner and reason, or the problem."""
    a, b = ("tuned", opponent) if ORDERS[order][0] == "A" else (opponent, "tuned")
    row = {"id": record_id, "pair": opponent, "order": order, "A": a, "B": b}
    if reply.error is not None:
        return row | {
            "winner": None,
            "reason": None,
            "problem": f"request failed: {as_judge_fields(reply.error)}",
        }
    verdict, problem = parse_answer(reply.text, PairVerdict)
    if verdict is None:
        return row | {"winner": None, "reason": None, "problem": f"malformed: {problem}", "raw": reply.text}
    return row | {"winner": verdict.winner, "reason": verdict.reason, "problem": None}


def side_of(verdict: dict[str, Any]) -> str | None:
    """Which model an ordered verdict picked ('tuned', the opponent, 'tie'), None without one."""
    winner = verdict["winner"]
    return verdict[winner] if winner in ("A", "B") else winner


def combine(ab: dict[str, Any] | None, ba: dict[str, Any] | None) -> dict[str, Any]:
    """One pair's result from its two orders: winner (tuned, the opponent, tie, or None) and whether
    the orders agreed (None: not both answered)."""
    if ab is None or ba is None:
        return {"winner": "tie", "consistent": None, "reason": "identical replies: a tie, not asked"}
    if problems := [f"{v['order']}: {v['problem']}" for v in (ab, ba) if v["problem"]]:
        return {"winner": None, "consistent": None, "reason": "no verdict; " + "; ".join(problems)}
    first, second = side_of(ab), side_of(ba)
    if first == second:
        return {"winner": first, "consistent": True, "reason": ab["reason"]}
    return {
        "winner": "tie",
        "consistent": False,
        "reason": f"the orders disagree (AB picked {first}, BA picked {second}): position bias, a tie",
    }


def pair_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Wins, losses and ties of the tuned model, its win rate (ties count half) and the share of
    pairs whose two orders agreed."""
    winners = Counter(result["winner"] for result in results)
    wins, ties = winners["tuned"], winners["tie"]
    losses = sum(count for winner, count in winners.items() if winner not in ("tuned", "tie", None))
    judged = wins + losses + ties
    answered = [result["consistent"] for result in results if result["consistent"] is not None]
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "no_verdict": winners[None],
        "identical": sum(r["consistent"] is None and r["winner"] == "tie" for r in results),
        "win_rate": (wins + 0.5 * ties) / judged if judged else None,
        "position_consistency": sum(answered) / len(answered) if answered else None,
    }


def request_stats(replies: list[TeacherReply]) -> dict[str, int]:
    """How many requests the judge was sent or served from recordings, and their tokens."""
    return {
        "total": len(replies),
        "recorded": sum(reply.recorded for reply in replies),
        "failed": sum(reply.error is not None for reply in replies),
        "prompt_tokens": sum(reply.prompt_tokens for reply in replies if not reply.recorded),
        "completion_tokens": sum(reply.completion_tokens for reply in replies if not reply.recorded),
    }


def judge_table(stats: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The stage's stats as a table (a row per opponent) and its caption, for the UI."""
    rows = [
        {
            "tuned vs": opponent,
            **{key: pair[key] for key in ("wins", "losses", "ties", "no_verdict")},
            "win_rate": _share(pair["win_rate"]),
            "position_consistency": _share(pair["position_consistency"]),
        }
        for opponent, pair in stats["pairs"].items()
    ]
    skipped = "; ".join(f"{opponent} skipped: {why}" for opponent, why in stats["skipped"].items())
    caption = f"Judge {stats['judge_model']}: the tuned model's wins, each pair asked in both orders"
    return rows, caption + (f" ({skipped})" if skipped else "")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- asking


def ask_judge(
    spec: JudgeSpec, conversations: list[list[dict[str, Any]]], api_key: str | None = None
) -> list[TeacherReply]:
    """The judge's replies, in order, through the teacher client. Raises JudgeError for a setting to
    fix, TeacherUnreachable when any request failed for a reason a later try may cure."""
    try:
        replies = ask_teacher(spec.endpoint, conversations, api_key=api_key)
    except TeacherError as error:
        raise JudgeError(as_judge_fields(str(error))) from None
    except TeacherUnreachable as error:
        raise TeacherUnreachable(as_judge_fields(str(error))) from None
    failed = [as_judge_fields(r.error) for r in replies if r.error is not None and TRANSIENT.match(r.error)]
    if failed:
        endpoint = spec.endpoint
        kept = (
            f"the {len(replies) - len(failed)} answered are recorded in {endpoint.recordings}, so the next "
            "try asks only the failed ones"
            if endpoint.mode == "record"
            else "set evaluate.judge.endpoint.mode: record to keep the answered ones for the next try"
        )
        raise TeacherUnreachable(
            f"judge {endpoint.model} at {endpoint.base_url}: {len(failed)} of {len(replies)} request(s) "
            f"failed (the first: {failed[0]}); {kept}"
        )
    return replies


def as_judge_fields(message: str) -> str:
    """A teacher client message with its recipe fields named as the judge's (evaluate.judge.endpoint)."""
    message = message.replace("teacher.", "evaluate.judge.endpoint.")
    return re.sub(r"\bteacher\b", "judge", message)


# ---------------------------------------------------------------- rubric assertions


def rubric_judge(spec: JudgeSpec | None, api_key: str | None = None) -> RubricJudge | None:
    """What suites.run_checks asks about `rubric` assertions: the judge of `spec`, or None without
    one (the assertions stay not run)."""
    return None if spec is None else partial(judge_rubrics, spec, api_key=api_key)


def judge_rubrics(
    spec: JudgeSpec, items: list[RubricItem], *, api_key: str | None = None
) -> list[tuple[bool | None, str]]:
    """(passed, why) per (rubric, conversation, reply): the judge's yes or no and its reason; None
    (not run) with the reason when its answer is unusable."""
    conversations = [rubric_messages(rubric, turns, reply) for rubric, turns, reply in items]
    replies = ask_judge(spec, conversations, api_key) if conversations else []
    return [rubric_outcome(reply) for reply in replies]


def rubric_messages(criterion: str, turns: list[dict[str, Any]], reply: str) -> list[dict[str, str]]:
    """The request for one rubric assertion: the criterion, the conversation and the reply."""
    user = f"<conversation>\n{render_turns(turns)}\n</conversation>\n\n<reply>\n{reply}\n</reply>"
    return [
        {"role": "system", "content": RUBRIC_SYSTEM.format(criterion=criterion)},
        {"role": "user", "content": user},
    ]


def rubric_outcome(reply: TeacherReply) -> tuple[bool | None, str]:
    """One rubric verdict as suites report it: passed or failed with the judge's reason."""
    if reply.error is not None:
        return None, f"not run: the judge's request failed: {as_judge_fields(reply.error)}"
    verdict, problem = parse_answer(reply.text, RubricVerdict)
    if verdict is None:
        return None, f"not run: the judge's answer is malformed ({problem})"
    return verdict.satisfied, f"judge: {verdict.reason}" if verdict.reason else "judge: no reason given"
