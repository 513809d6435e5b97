"""The recipe's `select` section: the rule that picks the base model among `model.candidates`,
each scored on the validation split before training. Re-exported by tuneline.recipe."""

from __future__ import annotations

from pydantic import Field

from tuneline.recipe.evaluate import PromoteMetric
from tuneline.recipe.section import Section

# What a candidate can be ranked by: what promotion may compare (a task metric, the loss, or the
# test suites' pass rate).
SelectMetric = PromoteMetric


class SelectSpec(Section):
    """How the select stage picks the base model among `model.candidates` (docs/evaluate.md,
    "Choosing the base model"). Unused when `model.candidates` is empty."""

    metric: SelectMetric | None = Field(
        None,
        description="The metric that ranks candidates on the validation split (loss: lower wins; "
        "suite_pass_rate: evaluate.suites, zero-shot); default: evaluate.metric. With few_shot > 0 the "
        "few-shot score of a task metric or loss ranks.",
    )
    few_shot: int = Field(
        0,
        ge=0,
        le=32,
        description="Also score each candidate with this many train-split examples prepended as earlier "
        "user/assistant turns (0: zero-shot only).",
    )
    max_train_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Only candidates whose training-memory estimate (GiB, as `tuneline train plan` "
        "prints it for the train section) is at most this.",
    )
    min_tokens_per_second: float | None = Field(
        None, gt=0, description="Only candidates that generate at least this many tokens/s on this machine."
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Only candidates whose mean time per greedy reply (one at a time) is at most this.",
    )
    max_examples: int | None = Field(
        None, ge=1, description="Score each candidate on at most this many validation records."
    )
    speed_examples: int = Field(
        8,
        ge=1,
        le=256,
        description="Validation prompts answered one at a time to measure tokens/s and latency.",
    )
