"""The recipe's `evaluate` section: which metrics and test suites score base vs tuned on the
test split. Re-exported by tuneline.recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneline.recipe.section import Section

# Task metrics the evaluate stage can compute; every one is a share, higher is better.
EvalMetric = Literal["exact_match", "label_accuracy", "rouge_l", "token_f1", "json_valid", "schema_match"]
# What `register.promote_metric` may name: a task metric, the loss, or the test suites' pass rate.
PromoteMetric = Literal[
    "exact_match",
    "loss",
    "label_accuracy",
    "rouge_l",
    "token_f1",
    "json_valid",
    "schema_match",
    "suite_pass_rate",
]


class EvaluateSpec(Section):
    """Base vs tuned model on the test split: loss, exact match and the chosen task metrics on
    greedy generations, and test suites of prompts with assertions."""

    metric: EvalMetric = Field(
        "exact_match", description="The headline metric of the report (computed even if not in `metrics`)."
    )
    metrics: list[EvalMetric] = Field(
        [],
        description="Metrics computed beside loss and exact match: label_accuracy (with a confusion "
        "table) for classification, rouge_l and token_f1 for free text, json_valid and schema_match "
        "(needs `json_schema`) for structured answers.",
    )
    json_schema: str | None = Field(
        None,
        description="JSON Schema file (relative to the project) that schema_match validates replies against.",
    )
    suites: list[str] = Field(
        [],
        description="Test-suite YAML files (relative to the project): cases of a prompt and assertions "
        "(equals, contains, regex, json_schema, numeric, rubric) run on base and tuned; docs/evaluate.md.",
    )
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test records.")

    def chosen_metrics(self) -> list[str]:
        """Every task metric the stage computes: exact match, the headline and `metrics`, once each."""
        return list(dict.fromkeys(["exact_match", self.metric, *self.metrics]))

    @model_validator(mode="after")
    def _schema_for_schema_match(self) -> EvaluateSpec:
        if "schema_match" in self.chosen_metrics() and not self.json_schema:
            raise ValueError(
                "schema_match needs a JSON Schema to check replies against: set evaluate.json_schema "
                "to a schema file, or drop schema_match"
            )
        return self


def promote_metric_problem(evaluate: EvaluateSpec, promote_metric: str) -> str | None:
    """Why `register.promote_metric` cannot be decided on with this evaluate section, or None."""
    if promote_metric == "suite_pass_rate":
        if not evaluate.suites:
            return "register.promote_metric is suite_pass_rate but evaluate.suites is empty: add a suite"
        return None
    if promote_metric != "loss" and promote_metric not in evaluate.chosen_metrics():
        return (
            f"register.promote_metric is {promote_metric} but the evaluate stage does not compute it: "
            f"add {promote_metric} to evaluate.metrics"
        )
    return None
