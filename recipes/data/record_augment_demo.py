"""Build the augmentation demo's seed file and its teacher recording (recipes/augment_demo.yaml).

Run `python recipes/data/record_augment_demo.py` from the project folder to rebuild
augment_demo_seeds.jsonl and recipes/recordings/augment_demo/. Both are committed, so the demo
runs offline in `teacher.mode: replay`. Run it again whenever the prompt the rounds send changes
(the demo's template, seeds, teacher settings, or Tuneline's answer-format text): a replay then
names the request that has no recording.

The teacher here is scripted: a loopback OpenAI-compatible server (tests/openai_server.py) gives
the answers written below, as a good but imperfect teacher would. Round 1 makes the usual
mistakes (a paraphrased seed, a "language model" disclaimer, unknown fields, personal data that
the review policy rejects); rounds 2 and 3 are cleaner, after the prompt lists those mistakes.
The rounds run through the same core functions and auto policy as the flow, in record mode.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import tempfile
from collections import defaultdict
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

RECIPE = ROOT / "recipes" / "augment_demo.yaml"
SEED_FILE = Path(__file__).with_name("augment_demo_seeds.jsonl")
SYSTEM = "Label the customer message with its intent."

SEEDS = {
    "refund": [
        "The kettle I bought stopped heating after three days. Can I get my money back?",
        "I returned the hiking boots two weeks ago and still haven't seen the refund",
        "please refund order 20931, the jacket was the wrong size",
        "do you refund gift cards if the item is sold out?",
    ],
    "shipping_status": [
        "Where's my package? Order 55102 was supposed to arrive yesterday",
        "tracking hasn't updated since Tuesday for my speaker",
        "has my order shipped yet or is it still in the warehouse",
        "the courier says delivered but nothing is at my door",
    ],
    "cancel_order": [
        "I placed an order an hour ago by accident, please cancel it",
        "cancel the sofa cushions I ordered this morning",
        "is it too late to cancel order 77314?",
        "I found it cheaper elsewhere, please stop my order",
    ],
    "change_address": [
        "I'm moving next week, can you send order 61440 to my new flat instead?",
        "typo in my street name on the order, it should be Elm Road not Elm Street",
        "please ship to my office address rather than home",
        "can I change where my parcel goes after it has shipped?",
    ],
    "reset_password": [
        "I can't remember my password and the reset link expired",
        "how do I change my password on the app",
        "my account says the password is wrong but I'm sure it's right",
        "never received the email to reset my login",
    ],
    "billing_issue": [
        "My card was charged twice for the same order",
        "why was I billed for shipping when the order was over the free delivery limit?",
        "there's a charge of 49.99 on my statement I don't recognise",
        "the discount code didn't come off my total",
    ],
    "product_info": [
        "Does the stand mixer come with a dough hook?",
        "is this rug machine washable",
        "what's the battery life of the wireless earbuds",
        "are the glass containers safe to put in the oven?",
    ],
    "store_hours": [
        "Are you open on bank holiday Monday?",
        "what time does the Glasgow shop close tonight",
        "is the outlet store open on Sundays",
        "when does the click and collect desk open in the morning",
    ],
    "speak_to_human": [
        "This chatbot isn't helping, I want a real person",
        "can someone from your team call me back",
        "transfer me to an agent please",
        "I'd rather explain this to a human",
    ],
    "complaint": [
        "The delivery driver threw my parcel over the fence and it broke",
        "I've been on hold for forty minutes, this is ridiculous",
        "the quality of the towels is nothing like the photos",
        "your staff at the Leeds branch were really rude to me today",
    ],
}


def pairs(*items: tuple[str, str]) -> list[dict[str, str]]:
    return [{"instruction": text, "input": "", "output": label} for text, label in items]


# The teacher's answers: round -> one batch of candidates per request (requests are answered in
# the order they arrive).
TEACHER = {
    1: [
        pairs(
            (
                "hi, the blender jug arrived cracked. I'd like my money refunded rather than a replacement",
                "refund",
            ),
            (
                "Order 30417 says 'out for delivery' since 8am, any idea when it'll actually turn up?",
                "shipping_status",
            ),
            ("I placed an order an hour ago by mistake, please cancel it", "cancel_order"),
            ("what sizes does the linen shirt come in, and does it run small?", "product_info"),
            (
                "I keep typing my password and it locks me out after 3 tries. How do I set a new one?",
                "reset_password",
            ),
        ),
        pairs(
            (
                "Hi, I'm Sarah Jones (sarah.jones82@gmail.com), the toaster I sent back "
                "still hasn't been refunded",
                "refund",
            ),
            (
                "the app won't let me update the delivery address on order 48820, "
                "can you change it to 14 Mill Lane?",
                "change_address",
            ),
            (
                "is the Manchester store open on Easter Sunday?",
                "As an AI language model, I would say the intent is store_hours",
            ),
            ("I got charged 12.50 for express shipping but I picked standard", "billing_issue"),
            ("put me through to a manager, I'm done with the bot", "speak_to_human"),
        ),
        [
            *pairs(
                ("my card 4929 1234 5678 9012 was charged for an order I never made", "billing_issue"),
                (
                    "the vacuum's box was soaking wet and the charger is missing. Really disappointed",
                    "complaint",
                ),
                ("does the air fryer have a dishwasher-safe basket?", "product_info"),
            ),
            {"text": "stop my order for the garden chairs", "label": "cancel_order"},
            *pairs(("when do you open on Saturday in Bristol", "store_hours")),
        ],
        pairs(
            ("I ordered a lamp on the 3rd and there's been no shipping email at all", "shipping_status"),
            (
                "Could you send my parcel to my parents' house in Cardiff? I'll be staying there",
                "change_address",
            ),
            ("forgot my password again, the reset page just spins", "reset_password"),
            ("I'd like to return the unopened headphones for a refund, how do I do that?", "refund"),
            ("ok this is the third time I'm asking. Let me speak to someone", "speak_to_human"),
        ),
    ],
    2: [
        pairs(
            (
                "Bought a waffle maker as a gift but they already have one. Can I send it back for my money?",
                "refund",
            ),
            ("it's been 9 days, is my bookshelf order even on its way?", "shipping_status"),
            ("changed my mind about the rowing machine, can you cancel before it ships?", "cancel_order"),
            ("Can the delivery go to my neighbour at number 12 instead? I'm away that day", "change_address"),
            ("Forgot my password again and the reset page just keeps spinning", "reset_password"),
        ),
        pairs(
            ("I cancelled my subscription last month but you still took a payment", "billing_issue"),
            ("Is the cast iron pan suitable for induction hobs?", "product_info"),
            ("what are the opening times for the Bath store over Christmas?", "store_hours"),
            ("I need to talk to an actual person about a warranty claim", "speak_to_human"),
            (
                "Ordered next-day delivery, paid extra for it, and it came four days late. Not acceptable.",
                "complaint",
            ),
        ),
        pairs(
            ("The dress came with a hole in the seam - refund please, I don't want an exchange", "refund"),
            ("The tracking number you emailed doesn't work on the courier's website", "shipping_status"),
            ("Please cancel order 90126, I ordered two by mistake and only need one", "cancel_order"),
            ("I need to update the postcode on my order, I put my old one", "change_address"),
            ("the password reset code you text me never arrives", "reset_password"),
        ),
        pairs(
            ("my invoice shows VAT twice", "billing_issue"),
            ("how heavy is the folding bike? I'd have to carry it up two flights of stairs", "product_info"),
            ("is the Northampton branch open late on Thursdays", "store_hours"),
            ("is there a phone number where I can reach a human?", "speak_to_human"),
            ("The replacement you sent is also broken. Second time now, I'm fed up", "complaint"),
        ),
    ],
    3: [
        pairs(
            ("The shoes pinch at the toes, I'd like to send them back for a full refund", "refund"),
            ("Any update on the dining table? The delivery date keeps moving", "shipping_status"),
            ("I want to cancel my pre-order for the new console", "cancel_order"),
            ("I entered my work address by mistake, please redirect the parcel to my home", "change_address"),
            ("how do I reset the password if I no longer have access to my old email?", "reset_password"),
        ),
        pairs(
            ("I paid with PayPal but my credit card was charged as well", "billing_issue"),
            ("Is the memory foam pillow any good for side sleepers?", "product_info"),
            ("Are you open on New Year's Day?", "store_hours"),
            ("please have a supervisor contact me about my order", "speak_to_human"),
            ("The customer service email I got was rude and didn't answer my question", "complaint"),
        ),
        pairs(
            ("you said the refund went out on Monday but my bank shows nothing yet", "refund"),
            ("does 'in transit' mean it has left your warehouse?", "shipping_status"),
            ("can I cancel just one item from my order and keep the rest?", "cancel_order"),
            (
                "moving house on Friday - could you hold the parcel or send it to the new place?",
                "change_address",
            ),
            ("password reset says there's no account with my email", "reset_password"),
        ),
        pairs(
            (
                "the price dropped the day after I ordered, can you charge me the lower price?",
                "billing_issue",
            ),
            ("does the electric toothbrush come with a travel case", "product_info"),
            ("what time can I pick up click and collect orders on a Sunday", "store_hours"),
            ("stop sending me help links, I want to speak to someone", "speak_to_human"),
            ("three boxes and a bag of plastic for one phone charger? Your packaging is absurd", "complaint"),
        ),
    ],
}


def write_seeds() -> None:
    """The seed file: four labelled messages per intent, shuffled, Alpaca with a system prompt."""
    rows = [
        {"system": SYSTEM, "instruction": text, "input": "", "output": intent}
        for intent, texts in SEEDS.items()
        for text in texts
    ]
    random.Random(4).shuffle(rows)
    SEED_FILE.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def teacher_script():
    """Answer each request with the next batch of its round (read from the prompt's first line)."""
    served: defaultdict[int, int] = defaultdict(int)

    def script(request: Request) -> str:
        round_no = int(re.search(r"Round (\d+)", request.user_text).group(1))
        batch = TEACHER[round_no][served[round_no]]
        served[round_no] += 1
        return json.dumps({"candidates": batch}, ensure_ascii=False)

    return script


def main() -> None:
    write_seeds()
    recipe = load_recipe(RECIPE)
    spec = recipe.augment
    recordings = ROOT / spec.teacher.recordings
    shutil.rmtree(recordings, ignore_errors=True)
    with tempfile.TemporaryDirectory() as artifacts_dir, openai_server(teacher_script()) as server:
        # One request at a time: they arrive in order, so every run records the same answers.
        changes = {
            "mode": "record",
            "base_url": server.base_url,
            "recordings": str(recordings),
            "concurrency": 1,
        }
        teacher = spec.teacher.model_copy(update=changes)
        spec = spec.model_copy(update={"teacher": teacher})
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
    print(f"wrote {SEED_FILE} and {len(list(recordings.glob('*.json')))} recordings in {recordings}")


if __name__ == "__main__":
    main()
