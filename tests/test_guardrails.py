"""Promotion guardrails: each one reads an earlier stage's stats and can refuse a promotion."""

from __future__ import annotations

import pytest
import yaml

from tuneline.recipe import Guardrails, RecipeError, validate_recipe
from tuneline.register.guardrails import check_guardrails

BENCHMARKS = {
    "tasks": {"arc_easy": {"base": 0.52, "tuned": 0.49}, "hellaswag": {"base": 0.41, "tuned": 0.415}}
}
EVALUATE = {"tuned": {"exact_match": 0.9, "suite_pass_rate": 0.75}}
JUDGE = {"pairs": {"base": {"win_rate": 0.8}, "champion": {"win_rate": 0.45}}}


def verdicts(spec: Guardrails, evidence: dict) -> dict[str, tuple[bool, str]]:
    return {check.name: (check.passed, check.detail) for check in check_guardrails(spec, evidence)}


def test_no_guardrails_no_checks():
    assert check_guardrails(Guardrails(), {"benchmarks": BENCHMARKS}) == []


def test_a_benchmark_that_dropped_more_than_max_regression_refuses_and_is_named():
    found = verdicts(Guardrails(max_regression=2), {"benchmarks": BENCHMARKS})
    passed, detail = found["max_regression"]
    assert not passed
    assert "arc_easy 52.0 -> 49.0 (-3.0 points)" in detail and "hellaswag" not in detail
    assert verdicts(Guardrails(max_regression=3), {"benchmarks": BENCHMARKS})["max_regression"] == (
        True,
        "2 benchmark(s), worst change -3.0 points",
    )


@pytest.mark.parametrize(
    ("spec", "name", "reason"),
    [
        (Guardrails(max_regression=1), "max_regression", "set evaluate.benchmarks"),
        (Guardrails(min_suite_pass_rate=0.5), "min_suite_pass_rate", "set evaluate.suites"),
        (Guardrails(min_judge_win_rate=0.5), "min_judge_win_rate", "set evaluate.judge"),
        (Guardrails(min_human_win_rate=0.5), "min_human_win_rate", "set evaluate.human"),
    ],
)
def test_a_guardrail_without_its_evidence_refuses(spec, name, reason):
    passed, detail = verdicts(spec, {})[name]
    assert not passed and reason in detail


def test_suite_floor():
    assert verdicts(Guardrails(min_suite_pass_rate=0.75), {"evaluate": EVALUATE})["min_suite_pass_rate"][0]
    passed, detail = verdicts(Guardrails(min_suite_pass_rate=0.8), {"evaluate": EVALUATE})[
        "min_suite_pass_rate"
    ]
    assert not passed and detail == "tuned pass rate 0.750 < 0.8"


def test_win_rate_floor_applies_to_every_opponent():
    passed, detail = verdicts(Guardrails(min_judge_win_rate=0.5), {"judge": JUDGE})["min_judge_win_rate"]
    assert not passed and detail == "win rate below 0.5: vs champion 0.450"
    passed, detail = verdicts(Guardrails(min_judge_win_rate=0.4), {"judge": JUDGE})["min_judge_win_rate"]
    assert passed and "vs base 0.800" in detail and "vs champion 0.450" in detail


def test_guardrails_are_recipe_fields_with_bounds():
    text = """
name: demo
sources: [{name: s, path: data.jsonl}]
model: {name: tiny}
register: {model_name: demo, guardrails: {min_suite_pass_rate: 1.5}}
"""
    with pytest.raises(
        RecipeError, match=r"register\.guardrails\.min_suite_pass_rate: .*less than or equal to 1"
    ):
        validate_recipe(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("guardrail", "setting"),
    [
        ("max_regression: 2", "evaluate.benchmarks"),
        ("min_suite_pass_rate: 0.9", "evaluate.suites"),
        ("min_judge_win_rate: 0.5", "evaluate.judge"),
        ("min_human_win_rate: 0.5", "evaluate.human"),
    ],
)
def test_a_guardrail_without_the_evaluate_setting_it_reads_is_a_recipe_error(guardrail, setting):
    text = f"""
name: demo
sources: [{{name: s, path: data.jsonl}}]
model: {{name: tiny}}
register: {{model_name: demo, guardrails: {{{guardrail}}}}}
"""
    name = guardrail.split(":")[0]
    with pytest.raises(RecipeError, match=rf"register.guardrails.{name} reads {setting}, which is not set"):
        validate_recipe(yaml.safe_load(text))
