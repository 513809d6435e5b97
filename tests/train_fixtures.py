"""Shared setup of the training runtime tests: a tiny local base model and a split stage."""

from __future__ import annotations

from pathlib import Path

from tuneline import models
from tuneline.recipe import LoraSpec, ModelSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import StageRef, find_stage, write_stage

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
