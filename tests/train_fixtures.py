"""Shared setup of the training runtime tests: a tiny local base model and a split stage."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneline import models
from tuneline.recipe import LoraSpec, ModelSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import StageRef, find_stage, write_stage

QUICKSTART_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "support_intents.jsonl"

QUESTIONS = {
    "refund": ["I want my money back", "refund the lamp please", "can I get a refund", "money back now"],
    "shipping_status": ["where is my order", "my parcel has not arrived", "track order 12", "is it shipped"],
    "cancel_order": ["cancel order 7", "stop my order please", "I do not want the order", "cancel it all"],
}


def conversation(question: str, label: str) -> list[dict[str, str]]:
    """A labelling conversation: system prompt, the question, the label as the assistant's reply."""
    return [
        {"role": "system", "content": "Label the message."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": label},
    ]


def make_split_and_model(root: Path) -> tuple[StageRef, ModelSpec]:
    """A split stage (train and validation) and a tiny Llama model built from its words."""
    records = [make_record(conversation(q, label)) for label, qs in QUESTIONS.items() for q in qs]
    with write_stage(root / "art", "split", "s0") as writer:
        for index, record in enumerate(records):
            writer.count_in()
            writer.keep(record, "validation.jsonl" if index % 4 == 3 else "train.jsonl")
    corpus = [m["content"] for r in records for m in r["messages"]]
    base_dir = models.make_tiny_model(
        root / "base", corpus, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    return find_stage(root / "art", "split", "s0"), ModelSpec(name=str(base_dir))


def small_spec(**changes: object) -> TrainSpec:
    """A LoRA run of a few steps, logging every step."""
    spec = TrainSpec(
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        max_steps=3,
        learning_rate=1e-2,
        batch_size=2,
        max_length=64,
        logging_steps=1,
    )
    return spec.model_copy(update=changes)


def small_project(root: Path, name: str, **changes: object) -> Path:
    """A whole-run recipe file in `root` over the quickstart's first 120 records (bad lines
    included) and a tiny base model built from them; `changes` replace top-level sections.
    Returns the recipe's path."""
    lines = QUICKSTART_DATA.read_text().splitlines()[:120]
    (root / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    texts = [json.loads(line)["instruction"] for line in lines if line.endswith("}")]
    models.make_tiny_model(root / "base", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2)
    recipe = {
        "name": name,
        "artifacts_dir": str(root / "store"),
        "sources": [{"name": "tickets", "path": str(root / "tickets.jsonl")}],
        "gate": {"min_records": 50, "min_chars": 1, "max_chars": 400},
        "model": {"name": str(root / "base")},
        "train": {"max_steps": 3, "batch_size": 16, "max_length": 96, "lora": {"r": 4, "alpha": 8}},
        "evaluate": {"max_new_tokens": 3, "max_examples": 4},
        "register": {"model_name": name},
        **changes,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"
