"""The compare stage: a finished comparison batch, the judge's verdicts beside it, and the ratings.

It is written once the batch's answers are complete (tuneline.evaluate.compare), and holds:
- `outcomes.jsonl`: the batch's battles (which model won each blind pair, who decided);
- `judge_outcomes.jsonl`: with a judge stage and `evaluate.human.judge`, its combined verdicts as battles of a
  second rater (they join the ledger once per judge stage, marked `kind: judge`);
- `leaderboard.json` and the stats: the tuned model's wins, losses, ties and win rate (ties count
  half) against each opponent in this batch, and the leaderboard (Elo, Bradley-Terry with bootstrap
  intervals, games) over every human battle in the registered model's ledger; the judge gets its
  own pairs, leaderboard and its agreement with the people on the items both decided.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneline.evaluate import ratings
from tuneline.evaluate.compare import (
    Answer,
    CompareError,
    append_to_ledger,
    compare_command_line,
    finished_answers,
    human_battles,
    model_ids,
    read_items,
    read_ledger,
)
from tuneline.pipeline import COMPARE, compare_key
from tuneline.recipe.evaluate import HumanSpec
from tuneline.store import StageRef, StageWriter, iter_records, reuse_or_write

# The judge stage's combined verdicts: per example {"id", "pairs": {opponent: {"winner": "tuned", the
# opponent, "tie" or null}}} (tuneline.evaluate.judge).
JUDGMENTS = "judgments.jsonl"


def run_compare(
    artifacts_dir: str | Path,
    human: HumanSpec,
    evaluated: StageRef,
    batch: str,
    *,
    model_name: str,
    base_name: str,
    judged: StageRef | None = None,
) -> StageRef:
    """The compare stage of a finished batch; cached on the section, the evaluate (and judge) stage,
    the registered model and the code."""
    judged = judged if human.judge else None
    digest = compare_key(human, evaluated, judged, model_name, base_name)

    def write(writer: StageWriter) -> None:
        answers = finished_answers(artifacts_dir, batch)
        if answers is None:
            raise CompareError(
                f"batch {batch} is not finished; answer it with `{compare_command_line('decide')}`"
            )
        items = read_items(artifacts_dir, batch)
        ids = model_ids(artifacts_dir, evaluated, base_name, model_name)
        battles = human_battles(batch, items, {row["id"]: Answer.model_validate(row) for row in answers})
        writer.count_in(len(battles))
        for battle in battles:
            writer.keep(battle, "outcomes.jsonl")
        judge = judge_battles(judged, ids) if judged is not None else []
        writer.count_in(len(judge))
        for battle in judge:
            writer.keep(battle, "judge_outcomes.jsonl")
        if judge:
            append_to_ledger(artifacts_dir, model_name, judge[0]["batch"], judge)
        history = read_ledger(artifacts_dir, model_name)
        writer.stats = human_stats(batch, ids, battles, history, human)
        if judge:
            writer.stats["judge"] = judge_stats(ids, battles, judge, history, human)
        writer.path("leaderboard.json").write_text(json.dumps(writer.stats["leaderboard"], indent=1))

    inputs = [evaluated, *([judged] if judged is not None else [])]
    return reuse_or_write(artifacts_dir, COMPARE, digest, write, inputs)


def judge_battles(judged: StageRef, ids: dict[str, str]) -> list[dict[str, Any]]:
    """The judge's combined verdicts (both orders asked) on pairs this run has ids for, as battles
    with the tuned model as model_a; pairs the judge left without a verdict are left out."""
    battles = []
    for row in iter_records(judged, JUDGMENTS):
        for pair, result in row["pairs"].items():
            outcome = {"tuned": "model_a", pair: "model_b", "tie": "tie"}.get(result.get("winner"))
            if pair not in ids or outcome is None:
                continue
            battles.append(
                {
                    "batch": f"judge:{judged.digest}",
                    "item": row["id"],
                    "pair": pair,
                    "model_a": ids["tuned"],
                    "model_b": ids[pair],
                    "winner": outcome,
                    "rater": "judge",
                    "kind": "judge",
                }
            )
    return battles


def pair_stats(battles: list[dict[str, Any]], tuned: str) -> dict[str, dict[str, Any]]:
    """Per opponent ("base", "champion"): the tuned model's wins, losses, ties and win rate (ties
    count half)."""
    pairs: dict[str, dict[str, Any]] = {}
    for battle in battles:
        counts = pairs.setdefault(battle["pair"], {"wins": 0, "losses": 0, "ties": 0})
        if battle["winner"] == "tie":
            counts["ties"] += 1
        else:
            counts["wins" if battle[battle["winner"]] == tuned else "losses"] += 1
    for counts in pairs.values():
        games = counts["wins"] + counts["losses"] + counts["ties"]
        counts["win_rate"] = round((counts["wins"] + counts["ties"] / 2) / games, 4)
    return pairs


def human_stats(
    batch: str,
    ids: dict[str, str],
    battles: list[dict[str, Any]],
    history: list[dict[str, Any]],
    human: HumanSpec,
) -> dict[str, Any]:
    """The stage's stats: this batch's pairs and the leaderboard over every human battle so far."""
    people = [b for b in history if b["kind"] == "human"]
    return {
        "batch": batch,
        "models": ids,
        "pairs": pair_stats(battles, ids["tuned"]),
        "raters": sorted({b["rater"] for b in battles}),
        "leaderboard": ratings.leaderboard(people, human.k_factor, human.bootstrap, human.seed),
        "history": {"battles": len(people), "batches": len({b["batch"] for b in people})},
    }


def judge_stats(
    ids: dict[str, str],
    battles: list[dict[str, Any]],
    judge: list[dict[str, Any]],
    history: list[dict[str, Any]],
    human: HumanSpec,
) -> dict[str, Any]:
    """The judge as a second rater: its pairs, its own leaderboard, and how often it agrees with
    the people on the (prompt, opponent) pairs both decided."""
    verdicts = {(b["item"], b["pair"]): tuned_score(b, ids["tuned"]) for b in judge}
    shared = [
        (tuned_score(b, ids["tuned"]), verdicts[(b["example"], b["pair"])])
        for b in battles
        if (b.get("example"), b["pair"]) in verdicts
    ]
    machine = [b for b in history if b["kind"] == "judge"]
    return {
        "pairs": pair_stats(judge, ids["tuned"]),
        "agreement": round(sum(h == j for h, j in shared) / len(shared), 4) if shared else None,
        "agreement_items": len(shared),
        "leaderboard": ratings.leaderboard(machine, human.k_factor, human.bootstrap, human.seed),
    }


def tuned_score(battle: dict[str, Any], tuned: str) -> float:
    """1 if the tuned model won the battle, 0 if it lost, 0.5 for a tie."""
    if battle["winner"] == "tie":
        return 0.5
    return 1.0 if battle[battle["winner"]] == tuned else 0.0
