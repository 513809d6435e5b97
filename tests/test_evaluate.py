"""The evaluate stage: greedy replies, exact match, assistant loss and the stage's ledger."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from tuneline import models
from tuneline.cli.console import print_report
from tuneline.errors import UserError
from tuneline.evaluate import stage as evaluate
from tuneline.evaluate import suites
from tuneline.pipeline import evaluate_key
from tuneline.recipe import EvaluateSpec, ModelSpec, validate_recipe
from tuneline.records import make_record
from tuneline.report import render_markdown
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
    assert set(rows[0]) == {"id", "prompt", "reference", "base", "tuned"}
    assert rows[0]["prompt"][-1]["role"] == "user"
    rescored = evaluate.exact_match([row["tuned"] for row in rows], [row["reference"] for row in rows])
    assert stats["tuned"]["exact_match"] == pytest.approx(rescored)
    assert math.isfinite(stats["base"]["loss"])
    again = evaluate.run_evaluate(root / "art", splits, trained, tiny["spec"], spec)
    assert read_manifest(again)["finished_at"] == read_manifest(ref)["finished_at"]

    # With a champion in the registry, it is scored on the same examples: a third column and row.
    champion = evaluate.Champion("4", "t-old", ModelSpec(name=str(trained.dir / "model")))
    other = EvaluateSpec(max_new_tokens=4, batch_size=2, max_examples=2)
    stats = read_stats(evaluate.run_evaluate(root / "art", splits, trained, tiny["spec"], other, champion))
    assert stats["champion_version"] == "4" and stats["champion_train_digest"] == "t-old"
    assert stats["champion"] == pytest.approx(stats["tuned"])  # the same weights again
    written = find_stage(root / "art", "evaluate", evaluate_key(tiny["spec"], other, splits, trained))
    assert [row["champion"] for row in iter_records(written, "predictions.jsonl")] == [
        row["tuned"] for row in rows[:2]
    ]


QUICK = {
    "name": "x",
    "sources": [{"name": "s", "path": "d.jsonl"}],
    "model": {"name": "m"},
    "register": {"model_name": "x"},
}


def test_run_evaluate_with_metrics_and_a_suite(tiny, monkeypatch):
    root = tiny["root"] / "with_suite"
    monkeypatch.chdir(tiny["root"])  # suite paths are relative to the project folder
    with write_stage(root, "split", "s0") as writer:
        for record in [make_record(c) for c in CONVERSATIONS]:
            writer.count_in()
            writer.keep(record, "test.jsonl")
    with write_stage(root, "train", "t0") as writer:
        tiny["model"].save_pretrained(writer.path("model"))
        tiny["tokenizer"].save_pretrained(writer.path("model"))
    splits, trained = find_stage(root, "split", "s0"), find_stage(root, "train", "t0")
    (tiny["root"] / "suite.yaml").write_text(
        "system: Label the message.\ncases:\n"
        "  - name: refund\n    prompt: money back\n    assert:\n"
        "      - equals: refund\n      - regex: '.*'\n      - rubric: polite\n",
        encoding="utf-8",
    )
    spec = EvaluateSpec(
        max_new_tokens=4,
        batch_size=5,
        metrics=["label_accuracy", "rouge_l", "token_f1"],
        suites=["suite.yaml"],
    )

    ref = evaluate.run_evaluate(root, splits, trained, tiny["spec"], spec)

    stats = read_stats(ref)
    assert stats["metrics"] == ["exact_match", "label_accuracy", "rouge_l", "token_f1"]
    for side in ("base", "tuned"):
        assert set(stats[side]) >= {"label_accuracy", "rouge_l", "token_f1", "suite_pass_rate"}
        assert sum(n for row in stats["confusion"][side].values() for n in row.values()) == len(CONVERSATIONS)
    suite = stats["suites"]["tuned"]
    assert suite["by_kind"]["regex"] == {"passed": 1, "failed": 0, "not_run": 0, "pass_rate": 1.0}
    assert suite["by_kind"]["rubric"]["reason"] == "not run: no judge configured"
    failures = [json.loads(line) for line in ref.file("suite_failures.jsonl").read_text().splitlines()]
    assert {row["kind"] for row in failures} <= {"equals", "rubric"}
    assert any(row["kind"] == "rubric" and row["model"] == "tuned" for row in failures)
    assert check_ledger(ref)["out"] == len(CONVERSATIONS)  # suite cases are not test records

    # The report shows the chosen metrics and the suite's pass rates per assertion kind.
    markdown = render_markdown({"funnel": [], "stage_dirs": {}, "evaluation": stats})
    assert (
        "| model | loss | exact_match | label_accuracy | rouge_l | token_f1 | suite_pass_rate |" in markdown
    )
    assert "| rubric | not run: no judge configured | not run: no judge configured |" in markdown
    assert "| regex | 1/1 | 1/1 |" in markdown
    assert "- suite.yaml: refund (equals): expected 'refund', got" in markdown  # the tiny model fails it
    console = Console(record=True, width=120)
    print_report(
        {"funnel": [], "stage_dirs": {}, "evaluation": stats}, validate_recipe(QUICK), "http://x", console
    )
    shown = console.export_text()
    assert "label_accuracy" in shown and "suite_pass_rate" in shown
    assert "not run: no judge configured" in shown and "suite_failures.jsonl" in shown

    # Editing the suite re-runs the stage; an unchanged suite reuses it.
    assert evaluate_key(tiny["spec"], spec, splits, trained) == ref.digest
    (tiny["root"] / "suite.yaml").write_text(
        "cases:\n  - prompt: hi\n    assert: [{contains: x}]\n", encoding="utf-8"
    )
    assert evaluate_key(tiny["spec"], spec, splits, trained) != ref.digest


def test_run_evaluate_bad_suite_fails_before_loading_models(tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("cases:\n  - prompt: hi\n    assert: [{regex: '('}]\n")
    monkeypatch.setattr(evaluate.models, "load_trained", lambda *a, **k: pytest.fail("a model was loaded"))
    with write_stage(tmp_path / "art", "split", "s0") as writer:
        writer.count_in()
        writer.keep(make_record(CONVERSATIONS[0]), "test.jsonl")
    with write_stage(tmp_path / "art", "train", "t0"):
        pass
    splits, trained = find_stage(tmp_path / "art", "split", "s0"), find_stage(tmp_path / "art", "train", "t0")
    with pytest.raises(
        suites.SuiteError, match=r"bad.yaml:2: case 1: assert\[0\].regex: not a valid regular"
    ):
        evaluate.run_evaluate(
            tmp_path / "art", splits, trained, tiny["spec"], EvaluateSpec(suites=["bad.yaml"])
        )
    with pytest.raises(UserError, match="evaluate: file missing.yaml not found"):
        evaluate_key(tiny["spec"], EvaluateSpec(suites=["missing.yaml"]), splits, trained)
