"""The evaluate stage: base vs tuned model on the test split, by loss and by a task metric.

For every test conversation the reference is its last assistant turn and the prompt is every
turn before it. Each model is scored on:
- `loss` (and `perplexity = exp(loss)`): mean cross-entropy on the reference's tokens, masked
  the way training masks them;
- `exact_match`: share of greedy replies equal to the reference after strip + casefold. Only the
  final answer counts: a reply that opens with a <think>...</think> block (a model trained on
  chain-of-thought records) is compared without it, as is the reference, whose reasoning lives
  in `reasoning_content`, not in its content;
- the task metrics `evaluate.metrics` adds (tuneline/evaluate/metrics.py), and with
  `label_accuracy` a confusion table per model (stats `confusion`, file `confusion.json`);
- with `evaluate.suites`, each test suite (tuneline/evaluate/suites.py): its cases' replies
  checked against their assertions, `suite_pass_rate` in the scores, pass rates per assertion
  kind in stats `suites`, every failed or not-run assertion in `suite_failures.jsonl`.

`generate_replies` is standalone on purpose: the registry reuses it to serve the registered model.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tuneline import models
from tuneline.errors import UserError
from tuneline.evaluate import metrics as task_metrics
from tuneline.evaluate import suites as test_suites
from tuneline.evaluate.judge import rubric_judge
from tuneline.pipeline import EVALUATE, evaluate_key
from tuneline.recipe import EvaluateSpec, ModelSpec
from tuneline.records import split_think
from tuneline.store import StageRef, StageWriter, iter_records, reuse_or_write

# How many of the tuned model's failed suite assertions the stats (and the run report) list.
FAILURES_SHOWN = 20


def split_conversation(
    conversation: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(prompt turns, last assistant turn); with no assistant turn, the whole conversation and None."""
    last = models.last_assistant_index(conversation)
    if last is None:
        return list(conversation), None
    return list(conversation[:last]), conversation[last]


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy replies to each conversation's turns before its last assistant turn.

    Batches are left-padded (generation continues from the right end of every row); replies are
    decoded without special tokens and stripped. Same inputs and batch size, same replies.
    """
    from transformers import GenerationConfig

    prompts = [
        tokenizer.apply_chat_template(split_conversation(c)[0], add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad_id,
    )
    replies: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,  # the chat template already wrote any BOS it wants
            ).to(model.device)
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return replies


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end a reply: the tokenizer's eos and any the model's generation config lists."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *ids] if i is not None))


def reply_labels(tokenizer: Any, conversation: list[dict[str, Any]]) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) for a conversation up to its last assistant turn; labels are -100 except
    on that turn's tokens (and, with `{% generation %}` markers, only on the marked ones)."""
    prompt, reply = split_conversation(conversation)
    if reply is None:
        return None
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    marked = models.has_generation_markers(tokenizer.chat_template)
    full = tokenizer.apply_chat_template(
        [*prompt, reply], tokenize=True, return_dict=True, return_assistant_tokens_mask=marked
    )
    input_ids = list(full["input_ids"])
    start = _common_prefix(prompt_ids, input_ids)
    mask = full["assistant_masks"] if marked else [1] * len(input_ids)
    labels = [t if i >= start and mask[i] else -100 for i, t in enumerate(input_ids)]
    return input_ids, labels


def assistant_loss(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]], *, batch_size: int
) -> float:
    """Mean cross-entropy per token of each conversation's last assistant turn (token-weighted)."""
    examples = [e for e in (reply_labels(tokenizer, c) for c in conversations) if e is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits.float()
        logits = logits[:, -width:]  # a soft-prompt model puts its virtual tokens' logits first
        targets = labels[:, 1:].to(model.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += losses.item()
        count += int((targets != -100).sum())
    return total / count if count else float("nan")


def normalize_answer(text: str) -> str:
    """What exact match compares: the final answer (after any leading think block; none when the
    block was never closed) stripped and casefolded."""
    return split_think(text)[1].strip().casefold()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after normalization."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)


def score_model(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    evaluate: EvaluateSpec,
    schema: dict[str, Any] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Loss, perplexity, exact match and the recipe's task metrics of one model, with its replies."""
    references = [split_conversation(c)[1]["content"] for c in conversations]
    replies = generate_replies(
        model,
        tokenizer,
        conversations,
        max_new_tokens=evaluate.max_new_tokens,
        batch_size=evaluate.batch_size,
    )
    loss = assistant_loss(model, tokenizer, conversations, batch_size=evaluate.batch_size)
    scores = {
        "loss": _finite(loss),
        "perplexity": _finite(math.exp(loss)) if math.isfinite(loss) and loss < 700 else None,
        "exact_match": _finite(exact_match(replies, references)),
    }
    scores |= task_metrics.task_metrics(evaluate.chosen_metrics(), replies, references, schema)
    return scores, replies


def run_evaluate(
    artifacts_dir: str | Path,
    splits: StageRef,
    trained: StageRef,
    model: ModelSpec,
    evaluate: EvaluateSpec,
    champion: Champion | None = None,
) -> StageRef:
    """Score the base and the tuned model on the test split and the test suites; cached on recipe,
    inputs, suite and schema files, and code.

    `champion` (the registry's champion) is scored too, on the same examples, so the
    register stage compares like with like. It is not part of the digest: a stage is evaluated
    once, against the champion of the time, as its registration is decided once."""
    digest = evaluate_key(model, evaluate, splits, trained)

    def write(writer: StageWriter) -> None:
        # Suites and schema are read before any model loads: a bad file fails in a second.
        suites = {path: test_suites.load_suite(path) for path in evaluate.suites}
        schema = load_json_schema(evaluate.json_schema) if evaluate.json_schema else None
        records = list(iter_records(splits, "test.jsonl"))
        limit = evaluate.max_examples or len(records)
        writer.count_in(len(records))
        chosen = []
        for record in records:
            conversation = [models.clean_message(m) for m in record["messages"]]
            last = models.last_assistant_index(conversation)
            if last is None:
                writer.drop(record, "no_assistant_turn", "messages: no assistant turn to compare with")
            elif len(chosen) >= limit:
                writer.drop({"id": record["id"]}, "beyond_max_examples", f"evaluate.max_examples is {limit}")
            else:
                chosen.append((record["id"], conversation[: last + 1]))
        conversations = [c for _, c in chosen]
        base = _score_folder(model, conversations, evaluate, schema, suites)
        tuned_spec = ModelSpec(
            name=str(models.trained_folder(trained.dir)),
            trust_remote_code=model.trust_remote_code,
            allow_pickle_weights=model.allow_pickle_weights,  # a soft-prompt adapter loads its base
        )
        tuned = _score_folder(tuned_spec, conversations, evaluate, schema, suites)
        sides = {"base": base, "tuned": tuned}
        if champion is not None:
            sides["champion"] = _score_folder(champion.model, conversations, evaluate, schema, suites)
        references = [conversation[-1]["content"] for conversation in conversations]
        for index, ((record_id, conversation), reference) in enumerate(zip(chosen, references, strict=True)):
            row = {"id": record_id, "prompt": conversation[:-1], "reference": reference}
            writer.keep(
                row | {side: result.replies[index] for side, result in sides.items()}, "predictions.jsonl"
            )
        writer.stats = {
            "examples": len(chosen),
            "metric": evaluate.metric,
            "metrics": evaluate.chosen_metrics(),
            **{side: result.scores for side, result in sides.items()},
        }
        if champion is not None:
            writer.stats |= {
                "champion_version": champion.version,
                "champion_train_digest": champion.train_digest,
            }
        if "label_accuracy" in evaluate.chosen_metrics():
            writer.stats["confusion"] = {
                side: task_metrics.confusion_table(result.replies, references)
                for side, result in sides.items()
            }
            writer.path("confusion.json").write_text(json.dumps(writer.stats["confusion"], indent=2))
        if suites:
            writer.stats["suites"] = {"files": list(suites)} | _write_suite_results(writer, sides)

    return reuse_or_write(artifacts_dir, EVALUATE, digest, write, [splits, trained])


def load_json_schema(path: str | Path) -> dict[str, Any]:
    """The JSON Schema file of `evaluate.json_schema`, checked; a bad one is a UserError."""
    import jsonschema

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except OSError as error:
        raise UserError(
            f"evaluate.json_schema: cannot read {path} ({error.strerror}); fix the path"
        ) from None
    except ValueError as error:
        raise UserError(f"evaluate.json_schema: {path} is not JSON ({error}); fix the file") from None
    except jsonschema.SchemaError as error:
        raise UserError(f"evaluate.json_schema: {path} is not a valid JSON Schema: {error.message}") from None
    return schema


class Champion(NamedTuple):
    """The registry's champion as the evaluate stage scores it: its version, the digest of the
    train stage that made it (how the ratings' ledger names it), and its model folder."""

    version: str
    train_digest: str | None
    model: ModelSpec


@dataclass
class Scored:
    """One model's scores, its replies to the test split and its suite results."""

    scores: dict[str, float | None]
    replies: list[str]
    suite_rows: list[dict[str, Any]] = field(default_factory=list)


def _write_suite_results(writer: StageWriter, sides: dict[str, Scored]) -> dict[str, Any]:
    """Every suite assertion that failed or did not run, per model, in `suite_failures.jsonl`;
    returns the pass rates per model and assertion kind."""
    with writer.path("suite_failures.jsonl").open("w", encoding="utf-8") as out:
        for side, result in sides.items():
            for row in result.suite_rows:
                if not row["passed"]:
                    out.write(json.dumps({"model": side, **row}, ensure_ascii=False) + "\n")
    summary = {side: test_suites.summarize(result.suite_rows) for side, result in sides.items()}
    failed = [
        {key: row[key] for key in ("suite", "case", "kind", "reason")}
        for row in sides["tuned"].suite_rows
        if row["passed"] is False
    ]
    return summary | {"tuned_failures": failed[:FAILURES_SHOWN]}


def _score_folder(
    spec: ModelSpec,
    conversations: list[list[dict[str, Any]]],
    evaluate: EvaluateSpec,
    schema: dict[str, Any] | None = None,
    suites: dict[str, test_suites.Suite] | None = None,
) -> Scored:
    """Load one model, score it on the test split and the suites, and free its memory before the
    next one loads."""
    suites = suites or {}
    if not conversations and not suites:
        empty = dict.fromkeys(["loss", "perplexity", *evaluate.chosen_metrics()])
        return Scored(empty, [])
    tokenizer = models.load_tokenizer(spec)
    model = models.load_spec(spec)
    try:
        if conversations:
            scores, replies = score_model(model, tokenizer, conversations, evaluate, schema)
        else:
            scores, replies = dict.fromkeys(["loss", "perplexity", *evaluate.chosen_metrics()]), []
        rows = run_suites(model, tokenizer, suites, evaluate, rubric_judge(evaluate.judge))
        if suites:
            scores["suite_pass_rate"] = test_suites.summarize(rows)["pass_rate"]
        return Scored(scores, replies, rows)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_suites(
    model: Any,
    tokenizer: Any,
    suites: dict[str, test_suites.Suite],
    spec: EvaluateSpec,
    judge: test_suites.RubricJudge | None = None,
) -> list[dict[str, Any]]:
    """The test suites on one loaded model: a row per assertion. Without `judge`, rubric
    assertions are not run (their rows say why)."""
    rows = []
    for name, suite in suites.items():
        replies = generate_replies(
            model,
            tokenizer,
            suite.conversations(),
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
        )
        rows += test_suites.run_checks(name, suite, replies, judge)
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
