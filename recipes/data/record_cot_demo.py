"""Record the chain-of-thought demo's teacher (recipes/cot_demo.yaml).

Run `python recipes/data/record_cot_demo.py` from the project folder to rebuild
recipes/recordings/cot_demo/ (committed, so the demo runs offline in `teacher.mode: replay`). Run
it again whenever the prompt the rounds send changes (the demo's template, seeds or teacher
settings, or Tuneline's cot answer-format text): a replay then names the request with no recording.

The teacher is scripted: a loopback OpenAI-compatible server (tests/openai_server.py) answers each
support message of the augmentation demo's seed file with a short step-by-step reasoning (what the
customer asks for, hence the intent) and the intent as final answer, in the JSON shape cot mode
asks for. Every seventh question of round 1 gets a typical mistake (no final answer, an answer
that says "see above", a one-line reasoning); round 2's prompt lists them.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from openai_server import Request, openai_server  # noqa: E402

from tuneline.augment.review import auto_decide  # noqa: E402
from tuneline.augment.rounds import (  # noqa: E402
    ReviewedRound,
    next_round_or_stop,
    read_candidates,
    round_summary,
    run_augment_merge,
    run_generate_round,
)
from tuneline.recipe import load_recipe  # noqa: E402
from tuneline.sources.collect import run_collect  # noqa: E402

RECIPE = ROOT / "recipes" / "cot_demo.yaml"
SEED_FILE = ROOT / "recipes" / "data" / "augment_demo_seeds.jsonl"

# What the customer wants, per intent: the middle step of the teacher's reasoning.
WANTS = {
    "refund": "they want their money back for something they bought",
    "shipping_status": "they want to know where their parcel is or when it arrives",
    "cancel_order": "they want to stop an order before it is delivered",
    "change_address": "they want the order delivered somewhere else",
    "reset_password": "they cannot log in and need a new password",
    "billing_issue": "something is wrong with what they were charged",
    "product_info": "they are asking about a product's features before or after buying",
    "store_hours": "they are asking when a shop or desk is open",
    "speak_to_human": "they want to talk to a person rather than the bot",
    "complaint": "they are unhappy with how they were treated or with what they got",
}
MISTAKES = [
    lambda reasoning, intent: {"reasoning": f"{reasoning} So the intent is {intent}.", "answer": ""},
    lambda reasoning, intent: {"reasoning": reasoning, "answer": "See the reasoning above."},
    lambda reasoning, intent: {"reasoning": "Obvious.", "answer": intent},
]


def teacher_script(labels: dict[str, str]):
    """Answer each question with reasoning and its intent; a few round-1 answers go wrong."""
    asked = {"count": 0}

    def script(request: Request) -> str:
        question = next(text for text in labels if text in request.user_text)
        intent = labels[question]
        reasoning = (
            f'The customer writes: "{question}". Reading it, {WANTS[intent]}. '
            f"Of the ten intents that matches {intent}."
        )
        asked["count"] += 1
        if "Round 1" in request.user_text and asked["count"] % 7 == 0:
            return json.dumps(MISTAKES[(asked["count"] // 7 - 1) % 3](reasoning, intent))
        return json.dumps({"reasoning": reasoning, "answer": intent})

    return script


def main() -> None:
    recipe = load_recipe(RECIPE)
    spec = recipe.augment
    recordings = ROOT / spec.teacher.recordings
    shutil.rmtree(recordings, ignore_errors=True)
    rows = [json.loads(line) for line in SEED_FILE.read_text(encoding="utf-8").splitlines()]
    labels = {row["instruction"]: row["output"] for row in rows}
    with tempfile.TemporaryDirectory() as artifacts_dir, openai_server(teacher_script(labels)) as server:
        changes = {
            "mode": "record",
            "base_url": server.base_url,
            "recordings": str(recordings),
            "concurrency": 1,
        }
        spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update=changes)})
        collected = run_collect(artifacts_dir, recipe.sources)
        history: list[ReviewedRound] = []
        stop = None
        while stop is None:
            round_no = len(history) + 1
            generated = run_generate_round(artifacts_dir, spec, collected, round_no, history)
            decisions = [d.model_dump() for d in auto_decide(spec.review.auto, read_candidates(generated))]
            history.append(ReviewedRound(round_no=round_no, generated=generated, decisions=decisions))
            print(json.dumps(round_summary(history[-1])))
            stop = next_round_or_stop(history, spec)
        merged = run_augment_merge(artifacts_dir, collected, history)
        ledger = json.loads(merged.file("manifest.json").read_text())["ledger"]
        print(f"stopped: {stop}; augment stage ledger: {ledger}")
    print(f"wrote {len(list(recordings.glob('*.json')))} recordings in {recordings}")


if __name__ == "__main__":
    main()
