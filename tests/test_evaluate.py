"""The evaluate stage: greedy replies, exact match, assistant loss and the stage's ledger."""

from __future__ import annotations

import math

import pytest
import torch

from tuneline import models
from tuneline.evaluate import stage as evaluate
from tuneline.recipe import EvaluateSpec, ModelSpec
from tuneline.records import make_record
from tuneline.store import check_ledger, find_stage, iter_records, read_manifest, read_stats, write_stage

LABELS = ["refund", "shipping_status", "cancel_order", "reset_password", "billing_issue"]


def conversation(question: str, label: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Label the message."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": label},
    ]


CONVERSATIONS = [conversation(f"question number {i} about {label}", label) for i, label in enumerate(LABELS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    corpus = [m["content"] for c in CONVERSATIONS for m in c] * 3
    base_dir = models.make_tiny_model(
        root / "base", corpus, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    spec = ModelSpec(name=str(base_dir))
    return {
        "root": root,
        "spec": spec,
        "model": models.load_model(base_dir),
        "tokenizer": models.load_tokenizer(spec),
    }


def test_generate_replies_is_deterministic(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    first = evaluate.generate_replies(model, tokenizer, CONVERSATIONS, max_new_tokens=5, batch_size=2)
    second = evaluate.generate_replies(model, tokenizer, CONVERSATIONS, max_new_tokens=5, batch_size=2)
    assert first == second and len(first) == len(CONVERSATIONS)
    assert all(isinstance(reply, str) and reply == reply.strip() for reply in first)
    assert not any(token in reply for reply in first for token in (models.IM_END, models.PAD))
    assert tokenizer.padding_side == "right"  # left padding is restored after generation


def test_left_padding_gives_the_same_replies_as_one_by_one(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    uneven = [
        conversation("hi", "refund"),
        conversation("a much longer question about my order " * 3, "refund"),
    ]
    batched = evaluate.generate_replies(model, tokenizer, uneven, max_new_tokens=4, batch_size=2)
    single = evaluate.generate_replies(model, tokenizer, uneven, max_new_tokens=4, batch_size=1)
    assert batched == single


@pytest.mark.parametrize(
    ("predictions", "references", "expected"),
    [
        (["refund", "cancel_order"], ["refund", "cancel_order"], 1.0),
        (["  Refund\n", "CANCEL_ORDER"], ["refund", "cancel_order"], 1.0),
        (["refund", "cancel"], ["refund", "cancel_order"], 0.5),
        (["refund please", ""], ["refund", "cancel_order"], 0.0),
    ],
)
def test_exact_match(predictions, references, expected):
    assert evaluate.exact_match(predictions, references) == expected


def test_exact_match_needs_one_prediction_per_reference():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        evaluate.exact_match(["a", "b"], ["a"])


def test_score_model_against_stub_answers(tiny, monkeypatch):
    known = [c[-1]["content"].upper() for c in CONVERSATIONS[:3]] + ["wrong", "also wrong"]
    monkeypatch.setattr(evaluate, "generate_replies", lambda *args, **kwargs: known)
    scores, replies = evaluate.score_model(tiny["model"], tiny["tokenizer"], CONVERSATIONS, EvaluateSpec())
    assert replies == known
    assert scores["exact_match"] == pytest.approx(3 / 5)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))


def test_assistant_loss_matches_model_loss(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    one = CONVERSATIONS[1]
    input_ids, labels = evaluate.reply_labels(tokenizer, one)
    assert tokenizer.decode([t for t, lab in zip(input_ids, labels, strict=True) if lab != -100]) == (
        "shipping_status<|im_end|>"
    )
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss.item()
    assert evaluate.assistant_loss(model, tokenizer, [one], batch_size=4) == pytest.approx(expected, rel=1e-5)
    # padding in a batch does not change the token-weighted mean
    batched = evaluate.assistant_loss(model, tokenizer, CONVERSATIONS, batch_size=5)
    singles = evaluate.assistant_loss(model, tokenizer, CONVERSATIONS, batch_size=1)
    assert batched == pytest.approx(singles, rel=1e-5)


def test_run_evaluate_ledger_and_stats(tiny):
    root = tiny["root"]
    records = [make_record(c) for c in CONVERSATIONS]
    no_reply = {"id": "no-reply", "messages": CONVERSATIONS[0][:2], "tools": None, "meta": {}}
    with write_stage(root / "art", "split", "s0") as writer:
        for record in [*records, no_reply]:
            writer.count_in()
            writer.keep(record, "test.jsonl")
    splits = find_stage(root / "art", "split", "s0")
    with write_stage(root / "art", "train", "t0") as writer:  # a "tuned" model equal to the base
        tiny["model"].save_pretrained(writer.path("model"))
        tiny["tokenizer"].save_pretrained(writer.path("model"))
    trained = find_stage(root / "art", "train", "t0")
    spec = EvaluateSpec(max_new_tokens=4, batch_size=2, max_examples=3)

    ref = evaluate.run_evaluate(root / "art", splits, trained, tiny["spec"], spec)

    assert check_ledger(ref) == {
        "in": 6,
        "out": 3,
        "dropped": {"beyond_max_examples": 2, "no_assistant_turn": 1},
    }
    stats = read_stats(ref)
    assert stats["examples"] == 3 and stats["metric"] == "exact_match"
    assert stats["base"] == pytest.approx(stats["tuned"])  # same weights, same scores
    rows = list(iter_records(ref, "predictions.jsonl"))
    assert [row["reference"] for row in rows] == LABELS[:3]
    assert set(rows[0]) == {"id", "reference", "base", "tuned"}
    rescored = evaluate.exact_match([row["tuned"] for row in rows], [row["reference"] for row in rows])
    assert stats["tuned"]["exact_match"] == pytest.approx(rescored)
    assert math.isfinite(stats["base"]["loss"])
    again = evaluate.run_evaluate(root / "art", splits, trained, tiny["spec"], spec)
    assert read_manifest(again)["finished_at"] == read_manifest(ref)["finished_at"]
