"""People compare replies blind, in pairs; their answers are stored so none is lost or asked twice.

For `evaluate.human.samples` test prompts (sampled with its seed from the evaluate stage's
predictions.jsonl) and each opponent (`against`: base, champion when the registry had one), the
tuned model's reply and the opponent's form an *item*, shown as reply A and reply B in an order
drawn from the batch's digest. A person picks A, B or tie and never sees which model wrote which.
Replies that are the same text are a tie without asking anyone.

The items form a *batch*, named by the digest of their content, stored like data review's under
`<artifacts_dir>/compare/<batch>/`: `items.jsonl` (with the hidden sides), `journal.jsonl`
(each answer appended and synced the moment it is given) and `answers.json`, written atomically
once every item has one. While a batch waits, `compare/pending/<batch>.json` names its run. The
Prefect form, `tuneline compare decide` and an export file (tuneline.evaluate.compare_file) all end
in the same `Answer` rows.

A finished batch's outcomes join the registered model's append-only ledger
(`compare/ledger/<model name>.jsonl`, once per batch), which every later rating reads: models are
`base:<model name>` and `tuned:<train stage digest>` (a champion is the tuned model of the run that
trained it), so ratings span the model's whole history. The compare stage (`run_compare`) then
holds the batch's outcomes, the judge's verdicts as a second rater, and the leaderboard.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

from filelock import FileLock
from pydantic import BaseModel, ConfigDict

from tuneline.augment.review import append_synced, now, read_journaled, write_atomic
from tuneline.errors import UserError
from tuneline.recipe.evaluate import HumanSpec
from tuneline.store import MANIFEST, STATS, StageRef, iter_jsonl, read_stats

Pick = Literal["A", "B", "tie"]
PICKS = ("A", "B", "tie")
IDENTICAL = "identical-replies"  # the rater of items whose two replies are the same text
ITEMS = "items.jsonl"


class CompareError(UserError):
    """A comparison that cannot be used: a bad answer file, an unknown batch or item."""


class CompareTimeout(UserError):
    """Nobody finished a comparison batch in time; its items and answers so far are kept."""


class Answer(BaseModel):
    """One person's pick on one item: which reply is better, A, B, or neither (tie)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    winner: Pick
    rater: str
    at: str


class PendingComparison(BaseModel):
    """What waits for people: written when a batch opens, removed when it is finished."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: str
    run_id: str
    run_name: str
    model_name: str  # the registered model whose ledger the outcomes join
    items_path: str
    count: int
    wait: str
    created_at: str
    api_url: str | None = None


class Wait(Protocol):
    """Show the form of `pending` pre-filled with `initial_form_data` (undecided rows only) and
    return the submitted `{"rater": ..., "rows": [{"id", "winner"}, ...]}`; `attempt` counts the
    asks from 1. Raises CompareTimeout when nobody answers in time."""

    def __call__(
        self, pending: PendingComparison, initial_form_data: dict[str, Any], attempt: int
    ) -> dict[str, Any]: ...


def compare_command_line(verb: str, *args: str) -> str:
    """A `tuneline compare` command as users type it: the one place its words are spelled."""
    return " ".join(("tuneline compare", verb, *args))


def model_label(name: str) -> str:
    """A base model's name as the ledger keeps it: a hub name as it is; a folder inside the
    artifact store (a dequantized GGUF) by its stage and digest, so another clone names it alike."""
    parts = Path(name).parts
    if "stages" in parts:
        kept = parts[parts.index("stages") + 1 :]
        return "/".join(kept[:2])
    return name


def model_ids(
    artifacts_dir: str | Path, evaluated: StageRef, base_name: str, model_name: str | None = None
) -> dict[str, str]:
    """The ledger's id of each side of the evaluate stage: base, tuned and (if scored) champion.

    The champion is the tuned model of the run that registered it: its train digest from the
    evaluate stage's stats, else from the register stage of `model_name` in `artifacts_dir` that
    created its version; else (registered elsewhere) its version, `champion:v<N>`."""
    inputs = json.loads(evaluated.file(MANIFEST).read_text(encoding="utf-8"))["inputs"]
    train_digest = next(ref["digest"] for ref in inputs if ref["stage"] == "train")
    ids = {"base": f"base:{model_label(base_name)}", "tuned": f"tuned:{train_digest}"}
    stats = read_stats(evaluated)
    if version := stats.get("champion_version"):
        registered = stats.get("champion_train_digest") or registered_train_digest(
            artifacts_dir, model_name, str(version)
        )
        ids["champion"] = f"tuned:{registered}" if registered else f"champion:v{version}"
    return ids


def registered_train_digest(artifacts_dir: str | Path, model_name: str | None, version: str) -> str | None:
    """The train digest of the register stage that created `version` of `model_name`, if exactly
    one register stage of this artifacts folder did."""
    found = set()
    for stats_path in (Path(artifacts_dir) / "stages" / "register").glob(f"*/{STATS}"):
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if stats.get("model_name") == model_name and str(stats.get("version")) == version:
            inputs = json.loads((stats_path.parent / MANIFEST).read_text(encoding="utf-8"))["inputs"]
            found |= {ref["digest"] for ref in inputs if ref["stage"] == "train"}
    return found.pop() if len(found) == 1 else None


def prompt_text(prompt: list[dict[str, Any]]) -> str:
    """The prompt as a person reads it: a lone user turn as it is, else every turn with its role
    (the system turn too: it says what the task is)."""
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"[{m.get('role')}] {m.get('content', '')}" for m in prompt)


def build_items(
    predictions: Iterable[dict[str, Any]], spec: HumanSpec, ids: dict[str, str]
) -> tuple[str, list[dict[str, Any]]]:
    """(batch digest, items): the sampled prompts against each opponent that has replies, each
    pair in the order the batch's digest draws."""
    rows = list(predictions)
    sampled = random.Random(spec.seed).sample(rows, min(spec.samples, len(rows)))
    pairs = []
    for row in sampled:
        for opponent in spec.against:
            if opponent in row and opponent in ids:
                pairs.append((row, opponent))
    content = [[r["id"], o, ids["tuned"], ids[o], r["tuned"], r[o]] for r, o in pairs]
    batch = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]
    order = random.Random(batch)
    items = []
    for row, opponent in pairs:
        sides = ["tuned", opponent]
        order.shuffle(sides)
        item_id = hashlib.sha256(f"{batch}/{row['id']}/{opponent}".encode()).hexdigest()[:10]
        items.append(
            {
                "id": item_id,
                "example": row["id"],
                "pair": opponent,
                "prompt": row["prompt"],
                "a": row[sides[0]],
                "b": row[sides[1]],
                "side_a": sides[0],
                "model_a": ids[sides[0]],
                "model_b": ids[sides[1]],
            }
        )
    return batch, items


def batch_dir(artifacts_dir: str | Path, batch: str) -> Path:
    return Path(artifacts_dir) / "compare" / batch


def pending_path(artifacts_dir: str | Path, batch: str) -> Path:
    return Path(artifacts_dir) / "compare" / "pending" / f"{batch}.json"


def ledger_path(artifacts_dir: str | Path, model_name: str) -> Path:
    return Path(artifacts_dir) / "compare" / "ledger" / f"{quote(model_name, safe='')}.jsonl"


def read_items(artifacts_dir: str | Path, batch: str) -> list[dict[str, Any]]:
    """The batch's items, in the order people are asked."""
    return list(iter_jsonl(batch_dir(artifacts_dir, batch) / ITEMS))


def record_answer(artifacts_dir: str | Path, batch: str, answer: Answer) -> None:
    """Journal one answer the moment it is given."""
    append_synced(batch_dir(artifacts_dir, batch) / "journal.jsonl", answer.model_dump_json())


def read_answers(artifacts_dir: str | Path, batch: str) -> dict[str, Answer]:
    """Answers given on a batch so far, by item id (the latest one wins)."""
    return read_journaled(batch_dir(artifacts_dir, batch), "answers.json", "answers", Answer)


def finished_answers(artifacts_dir: str | Path, batch: str) -> list[dict[str, Any]] | None:
    """The finished batch's answers, or None while some item has none."""
    final = batch_dir(artifacts_dir, batch) / "answers.json"
    return json.loads(final.read_text(encoding="utf-8"))["answers"] if final.is_file() else None


def undecided(items: list[dict[str, Any]], answers: dict[str, Answer]) -> list[dict[str, Any]]:
    """Items still waiting for an answer, in their order."""
    return [item for item in items if item["id"] not in answers]


def open_comparison(
    artifacts_dir: str | Path, pending: PendingComparison, items: list[dict[str, Any]]
) -> None:
    """Store the batch's items (once), tie the items whose replies are the same text, and announce
    the batch as waiting unless it is finished already."""
    folder = batch_dir(artifacts_dir, pending.batch)
    if not (folder / ITEMS).is_file():
        write_atomic(folder / ITEMS, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    answers = read_answers(artifacts_dir, pending.batch)
    for item in undecided(items, answers):
        if item["a"].strip() == item["b"].strip():
            record_answer(
                artifacts_dir, pending.batch, Answer(id=item["id"], winner="tie", rater=IDENTICAL, at=now())
            )
    if finished_answers(artifacts_dir, pending.batch) is None:
        if undecided(items, read_answers(artifacts_dir, pending.batch)):
            write_atomic(pending_path(artifacts_dir, pending.batch), pending.model_dump_json(indent=1))
        else:
            finish_batch(artifacts_dir, pending.batch, pending.model_name)


def finish_batch(artifacts_dir: str | Path, batch: str, model_name: str) -> list[dict[str, Any]]:
    """Once every item has an answer: write `answers.json`, add the outcomes to the model's ledger
    (once) and clear the pending file. Raises CompareError naming what is missing."""
    items = read_items(artifacts_dir, batch)
    answers = read_answers(artifacts_dir, batch)
    if missing := undecided(items, answers):
        raise CompareError(
            f"batch {batch}: {len(missing)} of {len(items)} comparisons have no answer yet; answer them "
            f"with `{compare_command_line('decide')}` or `{compare_command_line('import', 'FILE')}`"
        )
    rows = [answers[item["id"]].model_dump(mode="json") for item in items]
    final = batch_dir(artifacts_dir, batch) / "answers.json"
    if not final.is_file():
        write_atomic(final, json.dumps({"batch": batch, "answers": rows}, indent=1, ensure_ascii=False))
    append_to_ledger(artifacts_dir, model_name, batch, human_battles(batch, items, answers))
    pending_path(artifacts_dir, batch).unlink(missing_ok=True)
    return rows


def human_battles(
    batch: str, items: list[dict[str, Any]], answers: dict[str, Answer]
) -> list[dict[str, Any]]:
    """The batch's outcomes as battles (Arena's columns) with who decided each."""
    winner = {"A": "model_a", "B": "model_b", "tie": "tie"}
    return [
        {
            "batch": batch,
            "item": item["id"],
            "example": item["example"],
            "pair": item["pair"],
            "model_a": item["model_a"],
            "model_b": item["model_b"],
            "winner": winner[answers[item["id"]].winner],
            "rater": answers[item["id"]].rater,
            "kind": "human",
        }
        for item in items
    ]


def append_to_ledger(
    artifacts_dir: str | Path, model_name: str, batch: str, battles: list[dict[str, Any]]
) -> None:
    """Add a batch's battles to the model's ledger unless they are in it already (a re-run, two
    processes finishing the same batch)."""
    path = ledger_path(artifacts_dir, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        if any(row["batch"] == batch for row in read_ledger(artifacts_dir, model_name)):
            return
        for battle in battles:
            append_synced(path, json.dumps(battle, ensure_ascii=False))


def read_ledger(artifacts_dir: str | Path, model_name: str) -> list[dict[str, Any]]:
    """Every battle ever recorded for the registered model, oldest first (cut lines skipped)."""
    path = ledger_path(artifacts_dir, model_name)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def list_pending(artifacts_dir: str | Path, run: str | None = None) -> list[PendingComparison]:
    """Batches waiting for answers, oldest first; `run` keeps those whose run id or name starts so."""
    folder = Path(artifacts_dir) / "compare" / "pending"
    found = [
        PendingComparison.model_validate_json(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")
    ]
    if run:
        found = [p for p in found if p.run_id.startswith(run) or p.run_name.startswith(run)]
    return sorted(found, key=lambda p: p.created_at)


def find_pending(artifacts_dir: str | Path, run_or_batch: str) -> PendingComparison:
    """The waiting batch of a run (id or name prefix), or with this batch digest."""
    matches = [p for p in list_pending(artifacts_dir) if p.batch == run_or_batch] or list_pending(
        artifacts_dir, run_or_batch
    )
    if not matches:
        raise CompareError(
            f"no comparison waits for {run_or_batch!r} in {artifacts_dir}; "
            f"`{compare_command_line('list')}` shows what waits"
        )
    return matches[0]


def to_form_input(items: list[dict[str, Any]], answers: dict[str, Answer], rater: str) -> dict[str, Any]:
    """The form's data: one row per item still without an answer, its winner `undecided`. The
    same dict pre-fills the Prefect UI form and is sent as `run_input` to resume a run."""
    rows = [
        {
            "id": i["id"],
            "prompt": prompt_text(i["prompt"]),
            "reply_a": i["a"],
            "reply_b": i["b"],
            "winner": "undecided",
        }
        for i in undecided(items, answers)
    ]
    return {"rater": rater, "rows": rows}


def from_form_input(items: list[dict[str, Any]], form: dict[str, Any]) -> list[Answer]:
    """Answers from a submitted form; rows left `undecided` are asked again."""
    known = {item["id"] for item in items}
    rater = (form.get("rater") or "").strip() or "rater"
    return [
        Answer(id=row["id"], winner=row["winner"], rater=rater, at=now())
        for row in form.get("rows", [])
        if row.get("id") in known and row.get("winner") in PICKS
    ]


def ask_until_decided(
    artifacts_dir: str | Path, pending: PendingComparison, rater: str, wait: Wait, max_asks: int = 50
) -> list[dict[str, Any]]:
    """Ask until every item has an answer, storing each submission's answers; gives up with
    CompareTimeout after `max_asks` forms that left items undecided."""
    items = read_items(artifacts_dir, pending.batch)
    for attempt in range(1, max_asks + 1):
        form = wait(pending, to_form_input(items, read_answers(artifacts_dir, pending.batch), rater), attempt)
        if (done := finished_answers(artifacts_dir, pending.batch)) is not None:
            return done  # the terminal or an import finished it meanwhile
        for answer in from_form_input(items, form):
            record_answer(artifacts_dir, pending.batch, answer)
        if not undecided(items, read_answers(artifacts_dir, pending.batch)):
            return finish_batch(artifacts_dir, pending.batch, pending.model_name)
    raise CompareTimeout(
        f"batch {pending.batch}: {max_asks} forms left comparisons undecided; the answers so far are kept: "
        f"{'; or '.join(answer_ways(pending.run_name, ('terminal', 'file')))}, then re-run the recipe"
    )


def answer_ways(run_name: str, ways: Iterable[str] = ("prefect", "terminal", "file")) -> list[str]:
    """One line per way of answering a batch of run `run_name`."""
    lines = {
        "prefect": "Prefect UI: the run's **Resume** form, one row per comparison (winner A, B or tie)",
        "terminal": f"terminal: `{compare_command_line('decide', run_name)}`",
        "file": f"file: `{compare_command_line('export', run_name, '--to', 'compare.csv')}`, fill in "
        f"winner (A, B or tie), then `{compare_command_line('import', 'compare.csv')}`",
    }
    return [lines[way] for way in ways]


def compare_instructions(pending: PendingComparison) -> str:
    """What waits and how to answer it, as markdown (the form's description and the run's note)."""
    return (
        f"**{pending.count} blind comparisons wait** (batch `{pending.batch}`): for each prompt, which "
        "reply is better, A or B (or tie)? The replies come from the tuned model and another one, in "
        "random order.\n\n" + "\n".join(f"- {line}" for line in answer_ways(pending.run_name))
    )


def compare_timeout(pending: PendingComparison, timeout_s: float) -> CompareTimeout:
    """The error of a batch nobody finished within `evaluate.human.timeout_s`."""
    ways = "; or ".join(answer_ways(pending.run_name, ("terminal", "file")))
    return CompareTimeout(
        f"nobody finished comparison batch {pending.batch} within evaluate.human.timeout_s={timeout_s}. "
        f"Its items and the answers so far are kept in {Path(pending.items_path).parent}. "
        f"Answer the rest ({ways}), then re-run the recipe (it asks only what is unanswered); or raise "
        "evaluate.human.timeout_s, or set evaluate.human.wait: later"
    )
