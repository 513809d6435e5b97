"""Task metrics beside exact match: small pure functions over (predictions, references).

Each takes one prediction per reference and returns a share in [0, 1] (higher is better), or
NaN when there is nothing to score. Every metric looks at the final answer only: a leading
<think>...</think> block is cut first, as exact match does.

- `label_accuracy` (classification): the answer, stripped and casefolded, is the label;
  `confusion_table` counts reference label x predicted label (a reply that is no known label
  counts under `OTHER_LABEL`).
- `rouge_l` (free text): mean ROUGE-L F-measure from Google's `rouge-score`, with a Unicode word
  tokenizer (its default one drops every non-ASCII letter, so German or Chinese answers score 0).
- `token_f1` (free text): SQuAD's token F1: lowercase, drop punctuation and English articles,
  split on whitespace, F1 of the tokens in common.
- `json_valid`, `schema_match` (structured answers): the reply parses as JSON; the parsed reply
  also validates against a JSON Schema (`jsonschema`, the draft the schema names, else 2020-12).
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
from collections.abc import Callable
from typing import Any

from tuneline.records import split_think

# What `evaluate.metrics` may name; every one is higher-is-better.
METRICS = ("exact_match", "label_accuracy", "rouge_l", "token_f1", "json_valid", "schema_match")
OTHER_LABEL = "(other)"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_WORDS = re.compile(r"\w+")  # Unicode-aware: words of every script


def final_answer(text: str) -> str:
    """The answer a metric scores: the text after any leading think block, stripped."""
    return split_think(text)[1].strip()


def mean_score(
    score: Callable[[str, str], float], predictions: list[str], references: list[str], name: str
) -> float:
    """Mean of `score(prediction, reference)` over pairs; NaN with no pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    return sum(score(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def label_of(text: str) -> str:
    """A reply or reference as a class label: its final answer, casefolded."""
    return final_answer(text).casefold()


def label_accuracy(predictions: list[str], references: list[str]) -> float:
    """Share of replies whose label equals the reference's label."""
    return mean_score(
        lambda p, r: float(label_of(p) == label_of(r)), predictions, references, "label_accuracy"
    )


def confusion_table(predictions: list[str], references: list[str]) -> dict[str, dict[str, int]]:
    """{reference label: {predicted label: count}}; a prediction that is no reference label is
    counted under `OTHER_LABEL`, so a model that answers in prose does not add a column per reply."""
    labels = {label_of(r) for r in references}
    table: dict[str, dict[str, int]] = {}
    for prediction, reference in zip(predictions, references, strict=True):
        predicted = label_of(prediction)
        row = table.setdefault(label_of(reference), {})
        key = predicted if predicted in labels else OTHER_LABEL
        row[key] = row.get(key, 0) + 1
    return {label: dict(sorted(row.items())) for label, row in sorted(table.items())}


class _UnicodeWords:
    """A `rouge-score` tokenizer that keeps letters of every script (casefolded words)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.casefold())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words) of reply vs reference."""
    from rouge_score import rouge_scorer  # imports nltk: only when the metric is asked for

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())

    def score(prediction: str, reference: str) -> float:
        return scorer.score(final_answer(reference), final_answer(prediction))["rougeL"].fmeasure

    return mean_score(score, predictions, references, "rouge_l")


def squad_tokens(text: str) -> list[str]:
    """SQuAD's normalization: lowercase, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1_one(prediction: str, reference: str) -> float:
    """SQuAD's F1 of one reply: harmonic mean of token precision and recall (1.0 when both are empty)."""
    predicted, expected = squad_tokens(final_answer(prediction)), squad_tokens(final_answer(reference))
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: list[str], references: list[str]) -> float:
    """Mean SQuAD token F1 over replies."""
    return mean_score(token_f1_one, predictions, references, "token_f1")


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value) of a reply's final answer; (False, None) when it is not JSON."""
    try:
        return True, json.loads(final_answer(text))
    except ValueError:
        return False, None


def json_valid(predictions: list[str], references: list[str]) -> float:
    """Share of replies that parse as JSON (references are not looked at)."""
    return mean_score(lambda p, _: float(parse_json(p)[0]), predictions, references, "json_valid")


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    """Why `value` does not match `schema`: one line per violation (`path: message`), none if it does."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(value)
    ]


def schema_match(predictions: list[str], references: list[str], schema: dict[str, Any]) -> float:
    """Share of replies that parse as JSON and validate against `schema`."""

    def score(prediction: str, _: str) -> float:
        parsed, value = parse_json(prediction)
        return float(parsed and not schema_errors(value, schema))

    return mean_score(score, predictions, references, "schema_match")


def task_metrics(
    names: list[str], predictions: list[str], references: list[str], schema: dict[str, Any] | None = None
) -> dict[str, float | None]:
    """The metrics `names` asks for (all but exact match, which the stage always computes), each
    finite or None."""
    functions: dict[str, Callable[[list[str], list[str]], float]] = {
        "label_accuracy": label_accuracy,
        "rouge_l": rouge_l,
        "token_f1": token_f1,
        "json_valid": json_valid,
        "schema_match": lambda p, r: schema_match(p, r, schema or {}),
    }
    scores = {name: functions[name](predictions, references) for name in names if name in functions}
    return {name: value if math.isfinite(value) else None for name, value in scores.items()}
