"""Generate the quickstart's dataset: customer-support messages labelled with their intent.

Run `python recipes/data/generate_support_intents.py` to rebuild support_intents.jsonl. The
output is committed so the quickstart needs nothing but this repository. A few records are
bad on purpose (an empty answer, a line of broken JSON, duplicates), so that the quickstart's
funnel shows how Tuneline drops and accounts for them.
"""

import json
import random
from pathlib import Path

SYSTEM = "Label the customer message with its intent."

TEMPLATES = {
    "refund": [
        "I want my money back for the {product}",
        "can I get a refund on order {order}?",
        "please refund the {product} I returned last week",
        "how long does a refund take for order {order}",
        "the {product} was broken, I need a refund",
        "refund me for the {product} please",
        "I was charged for the {product} but I want a refund",
    ],
    "shipping_status": [
        "where is my order {order}?",
        "my {product} has not arrived yet",
        "when will order {order} be delivered",
        "tracking for the {product} says nothing since {day}",
        "is my package with the {product} shipped already?",
        "order {order} still not here, where is it",
        "can you check the delivery of my {product}",
    ],
    "cancel_order": [
        "cancel order {order} please",
        "I ordered the {product} by mistake, cancel it",
        "how do I cancel my order for the {product}",
        "please stop order {order}, I don't want it anymore",
        "I need to cancel the {product} I bought on {day}",
        "can order {order} still be cancelled?",
    ],
    "change_address": [
        "I moved, please update my shipping address",
        "can I change the delivery address for order {order}",
        "send the {product} to my new address in {city}",
        "wrong address on order {order}, it should go to {city}",
        "update my address to {city} before the {product} ships",
        "I need the {product} delivered to {city} instead",
    ],
    "reset_password": [
        "I forgot my password",
        "how do I reset my password",
        "the password reset email never came",
        "I can't log in, need a new password",
        "my password doesn't work since {day}",
        "locked out of my account, reset my password please",
    ],
    "billing_issue": [
        "I was charged twice for order {order}",
        "why is there an extra fee on my bill for the {product}",
        "my card was billed on {day} but I didn't order anything",
        "the invoice for order {order} is wrong",
        "you charged me the wrong price for the {product}",
        "there is a strange charge from you on {day}",
    ],
    "product_info": [
        "is the {product} waterproof?",
        "what size is the {product}",
        "does the {product} come with a warranty",
        "what colours does the {product} come in",
        "can you tell me more about the {product}",
        "is the {product} compatible with my phone",
    ],
    "store_hours": [
        "what time does the {city} store open",
        "are you open on {day}?",
        "when does your shop in {city} close",
        "opening hours of the {city} branch please",
        "is the store open late on {day}",
        "what are your hours in {city}",
    ],
    "speak_to_human": [
        "I want to talk to a real person",
        "can I speak with an agent please",
        "connect me to customer service, not a bot",
        "I need a human to help with order {order}",
        "let me talk to someone about the {product}",
        "get me a manager",
    ],
    "complaint": [
        "the {product} is terrible quality",
        "your service on {day} was awful",
        "I am very unhappy with the {product}",
        "the delivery driver was rude when bringing order {order}",
        "worst experience ever with the {city} store",
        "I want to file a complaint about the {product}",
    ],
}
PRODUCTS = [
    "blender",
    "headphones",
    "jacket",
    "laptop bag",
    "coffee maker",
    "desk lamp",
    "running shoes",
    "backpack",
    "phone case",
    "toaster",
    "smart watch",
    "yoga mat",
]
CITIES = ["Lyon", "Boston", "Leeds", "Porto", "Austin", "Dublin", "Oslo", "Denver"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday", "the weekend", "Christmas Eve"]


def main() -> None:
    rng = random.Random(7)
    rows = []
    for intent, templates in TEMPLATES.items():
        for _ in range(66):
            text = rng.choice(templates).format(
                product=rng.choice(PRODUCTS),
                order=rng.randint(10000, 99999),
                city=rng.choice(CITIES),
                day=rng.choice(DAYS),
            )
            if rng.random() < 0.3:
                text = text.capitalize()
            rows.append({"system": SYSTEM, "instruction": text, "input": "", "output": intent})
    rng.shuffle(rows)
    lines = [json.dumps(row) for row in rows]
    lines.insert(17, json.dumps({"system": SYSTEM, "instruction": "hello??", "input": "", "output": ""}))
    lines.insert(42, '{"system": "' + SYSTEM + '", "instruction": "where is my order 5512')  # broken JSON
    lines.insert(99, lines[100])  # an exact duplicate
    path = Path(__file__).with_name("support_intents.jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines to {path}")


if __name__ == "__main__":
    main()
