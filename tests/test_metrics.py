"""Task metrics beside exact match: each with a small table of cases."""

from __future__ import annotations

import math

import pytest

from tuneline.evaluate import metrics
from tuneline.recipe import EvaluateSpec, validate_recipe


@pytest.mark.parametrize(
    ("predictions", "references", "expected"),
    [
        (["refund", "cancel_order"], ["refund", "cancel_order"], 1.0),
        ([" Refund\n", "<think>hmm</think>cancel_order"], ["refund", "cancel_order"], 1.0),
        (["refund please", "refund"], ["refund", "cancel_order"], 0.0),
    ],
)
def test_label_accuracy(predictions, references, expected):
    assert metrics.label_accuracy(predictions, references) == expected


def test_confusion_table_counts_unknown_replies_as_other():
    table = metrics.confusion_table(
        ["refund", "refund", "I think you want a refund", "cancel_order"],
        ["refund", "cancel_order", "cancel_order", "cancel_order"],
    )
    assert table == {
        "cancel_order": {metrics.OTHER_LABEL: 1, "cancel_order": 1, "refund": 1},
        "refund": {"refund": 1},
    }


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("the cat sat", "the cat sat on the mat", 2 * 0.5 * 1.0 / 1.5),  # LCS 3: P 1, R 0.5
        ("dogs bark", "the cat sat", 0.0),
        ("Der Bär läuft schnell", "der bär läuft", 2 * 0.75 * 1.0 / 1.75),  # non-ASCII words count
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert metrics.rouge_l([prediction], [reference]) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower", 1.0),  # articles, case and punctuation are dropped
        ("Paris, France", "Paris", 2 * 0.5 * 1.0 / 1.5),
        ("London", "Paris", 0.0),
        ("", "", 1.0),
        ("a", "Paris", 0.0),  # only an article: no tokens left on one side
    ],
)
def test_token_f1(prediction, reference, expected):
    assert metrics.token_f1([prediction], [reference]) == pytest.approx(expected)


SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string"}, "priority": {"type": "integer"}},
    "required": ["intent"],
}


@pytest.mark.parametrize(
    ("reply", "valid", "matches"),
    [
        ('{"intent": "refund", "priority": 2}', 1.0, 1.0),
        ('{"priority": 2}', 1.0, 0.0),  # JSON, but `intent` is missing
        ('{"intent": "refund", "priority": "high"}', 1.0, 0.0),
        ("intent: refund", 0.0, 0.0),
        ('<think>json please</think>{"intent": "refund"}', 1.0, 1.0),
    ],
)
def test_json_valid_and_schema_match(reply, valid, matches):
    assert metrics.json_valid([reply], [""]) == valid
    assert metrics.schema_match([reply], [""], SCHEMA) == matches


def test_schema_errors_say_where_and_why():
    assert metrics.schema_errors({"intent": 3}, SCHEMA) == ["intent: 3 is not of type 'string'"]


def test_task_metrics_computes_only_the_chosen_and_gives_none_for_nothing():
    assert set(metrics.task_metrics(["rouge_l", "token_f1"], ["a b"], ["a b"])) == {"rouge_l", "token_f1"}
    assert metrics.task_metrics(["label_accuracy"], [], []) == {"label_accuracy": None}
    assert math.isnan(metrics.token_f1([], []))
    with pytest.raises(ValueError, match="token_f1: 1 predictions for 2 references"):
        metrics.token_f1(["a"], ["a", "b"])


def test_recipe_checks_metric_choices():
    assert EvaluateSpec(metric="rouge_l", metrics=["token_f1"]).chosen_metrics() == [
        "exact_match",
        "rouge_l",
        "token_f1",
    ]
    with pytest.raises(ValueError, match="set evaluate.json_schema"):
        EvaluateSpec(metrics=["schema_match"])
    base = {"name": "x", "sources": [{"name": "s", "path": "d.jsonl"}], "model": {"name": "m"}}
    with pytest.raises(ValueError, match="add rouge_l to evaluate.metrics"):
        validate_recipe({**base, "register": {"model_name": "x", "promote_metric": "rouge_l"}})
    with pytest.raises(ValueError, match="evaluate.suites is empty"):
        validate_recipe({**base, "register": {"model_name": "x", "promote_metric": "suite_pass_rate"}})
    recipe = validate_recipe(
        {
            **base,
            "evaluate": {"metrics": ["rouge_l"]},
            "register": {"model_name": "x", "promote_metric": "rouge_l"},
        }
    )
    assert recipe.register.promote_metric == "rouge_l"


def test_new_metrics_reach_mlflow_keys_and_promote_higher_is_better():
    from tuneline.register.registry import decide_promotion
    from tuneline.register.stage import evaluation_metrics

    stats = {
        "examples": 4,
        "base": {"loss": 2.0, "rouge_l": 0.1, "suite_pass_rate": 0.0},
        "tuned": {"loss": 0.5, "rouge_l": 0.6, "suite_pass_rate": 0.5, "schema_match": None},
        "suites": {"tuned": {"by_kind": {"regex": {"pass_rate": 1.0}, "rubric": {"pass_rate": None}}}},
    }
    assert evaluation_metrics(stats) == {
        "eval_examples": 4.0,
        "base_loss": 2.0,
        "base_rouge_l": 0.1,
        "base_suite_pass_rate": 0.0,
        "tuned_loss": 0.5,
        "tuned_rouge_l": 0.6,
        "tuned_suite_pass_rate": 0.5,
        "tuned_suite_regex_pass_rate": 1.0,
    }
    for metric in ("rouge_l", "token_f1", "label_accuracy", "json_valid", "schema_match", "suite_pass_rate"):
        assert decide_promotion(metric, 0.6, 0.5, 0.0, "1")[0] is True
        assert decide_promotion(metric, 0.4, 0.5, 0.0, "1")[0] is False
