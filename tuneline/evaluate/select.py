"""The select stage: choose the base model among `model.candidates` before training.

Each candidate (hub name, folder or GGUF file; `model.name` is one, first when not listed) is
scored on the validation split in a `select_candidate` stage of its own, keyed by its content (a
folder by the digest of its files, a hub model by name and revision), the validation split's
content, the few-shot examples and the scoring settings: adding a candidate scores only the new
one. A score holds the recipe's task metrics from the evaluate stage's `score_model` (zero-shot,
and with `select.few_shot` k train-split examples prepended as earlier user/assistant turns), the
parameter count, and generation speed measured here on `select.speed_examples` prompts answered
one at a time (tokens/s of the greedy replies, mean latency per reply).

The `select` stage then applies the recipe's rule: candidates outside a budget (the training-memory
estimate `tuneline train plan` computes, tokens/s, latency) are left out, the best by
`select.metric` wins, ties go to fewer parameters. It is cached on the scores, the rule and the
memory estimates, and logs the candidates' table to MLflow once.

GGUF resolution and the memory estimate live in the train layer, which this layer may not import:
the caller passes them in (`resolve`, `train_memory`), as tasks/stages.py does.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneline import models
from tuneline.errors import UserError
from tuneline.evaluate import suites as test_suites
from tuneline.evaluate.stage import generate_replies, load_json_schema, run_suites, score_model
from tuneline.experiment import TrackingTarget, is_number, open_experiment
from tuneline.pipeline import SELECT, SELECT_CANDIDATE, select_candidate_key, select_key
from tuneline.recipe import EvaluateSpec, ModelSpec, SelectSpec
from tuneline.store import (
    StageRef,
    StageWriter,
    files_digest,
    find_stage,
    folder_key,
    iter_records,
    read_manifest,
    read_stats,
    reuse_or_write,
)

GIB = 1024**3
VALIDATION = "validation.jsonl"
FEW_SHOT = "few_shot_"  # prefix of the few-shot scores' names


@dataclass(frozen=True)
class Candidate:
    """One candidate: the recipe field that names it, its name as written, and the model that loads."""

    field: str
    name: str
    spec: ModelSpec


def candidate_specs(model: ModelSpec) -> list[tuple[str, ModelSpec]]:
    """(recipe field, model) per candidate: `model.name` first unless `model.candidates` lists it."""
    names = list(model.candidates)
    fields = [f"model.candidates[{i}]" for i in range(len(names))]
    if model.name not in names:
        names, fields = [model.name, *names], ["model.name", *fields]
    return [
        (
            field,
            model.model_copy(
                update={
                    "name": name,
                    "revision": model.revision if name == model.name else None,
                    "candidates": [],
                }
            ),
        )
        for field, name in zip(fields, names, strict=True)
    ]


@contextmanager
def candidate_errors(field: str) -> Iterator[None]:
    """A user error about one candidate names its recipe field (`model.candidates[1]: ...`)."""
    try:
        yield
    except UserError as error:
        message = str(error).removeprefix("model.name: ")
        raise models.ModelError(f"{field}: {message}") from None


def resolve_candidates(model: ModelSpec, resolve: Callable[[ModelSpec], ModelSpec]) -> list[Candidate]:
    """Every candidate as a loadable model (`resolve`: a GGUF file into its base_model folder), its
    config read to catch a bad name before any model loads."""
    found = []
    for field, spec in candidate_specs(model):
        with candidate_errors(field):
            loadable = resolve(spec)
            check_loadable(loadable)
        found.append(Candidate(field, spec.name, loadable))
    return found


def check_loadable(spec: ModelSpec) -> None:
    """Read the model's config (no weights): a name that is no model fails here, in a second."""
    try:
        models.load_config(spec)
    except models.ModelError:
        raise
    except (OSError, ValueError) as error:  # e.g. a path that does not exist, taken for a hub name
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise models.ModelError(
            f"model.name: cannot load {spec.name!r} ({detail}); "
            "give a hub name, a model folder or a .gguf file"
        ) from None


def content_key(artifacts_dir: str | Path, spec: ModelSpec) -> str:
    """What a candidate's score is keyed on: a local folder's files by content, else name and revision."""
    folder = Path(spec.name)
    if not folder.is_dir():
        return f"hub:{spec.name}@{spec.revision or 'default'}"
    return folder_key(artifacts_dir, folder)


def ranking_metric(select: SelectSpec, evaluate: EvaluateSpec) -> str:
    """The score that ranks candidates: `select.metric` (default evaluate.metric), few-shot if asked
    (the suites' pass rate is zero-shot only)."""
    metric = select.metric or evaluate.metric
    return f"{FEW_SHOT}{metric}" if select.few_shot and metric != "suite_pass_rate" else metric


def scoring_spec(select: SelectSpec, evaluate: EvaluateSpec) -> EvaluateSpec:
    """The evaluate section the candidates are scored with: its metrics plus the ranking metric."""
    extra = [select.metric] if select.metric not in (None, "loss", "suite_pass_rate") else []
    return evaluate.model_copy(update={"metrics": list(dict.fromkeys([*evaluate.metrics, *extra]))})


def few_shot_turns(splits: StageRef, k: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The user/assistant turns of the first `k` train records that have a reply, and their ids."""
    turns, ids = [], []
    for record in iter_records(splits, "train.jsonl"):
        if len(ids) == k:
            break
        conversation = [models.clean_message(m) for m in record["messages"]]
        last = models.last_assistant_index(conversation)
        if last is not None:
            turns += [m for m in conversation[: last + 1] if m["role"] != "system"]
            ids.append(record["id"])
    return turns, ids


def with_shots(conversation: list[dict[str, Any]], shots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the example turns after its leading system turns."""
    lead = 0
    while lead < len(conversation) and conversation[lead]["role"] == "system":
        lead += 1
    return [*conversation[:lead], *shots, *conversation[lead:]]


def score_candidate(
    artifacts_dir: str | Path,
    candidate: Candidate,
    splits: StageRef,
    select: SelectSpec,
    evaluate: EvaluateSpec,
    echo: Callable[[str], None] = print,
) -> StageRef:
    """One candidate's scores on the validation split, its parameter count and speed; cached."""
    validation = splits.file(VALIDATION)
    shots, shot_ids = few_shot_turns(splits, select.few_shot)
    spec = scoring_spec(select, evaluate)
    schema_path = spec.json_schema if "schema_match" in spec.chosen_metrics() else None
    settings = {
        "metrics": spec.chosen_metrics(),
        "few_shot": select.few_shot,
        "max_examples": select.max_examples,
        "speed_examples": select.speed_examples,
        "max_new_tokens": spec.max_new_tokens,
        "batch_size": spec.batch_size,
        "chat_template": candidate.spec.chat_template,
        "device": models.choose_device()[0],  # speed is measured on this kind of device
        "schema": files_digest(schema_path) if schema_path else None,
        "suites": files_digest(*evaluate.suites) if evaluate.suites else None,
    }
    key = content_key(artifacts_dir, candidate.spec)
    digest = select_candidate_key(key, settings, files_digest(validation), shot_ids)

    def write(writer: StageWriter) -> None:
        chosen = _validation_conversations(writer, splits, select.max_examples)
        schema = load_json_schema(schema_path) if schema_path else None
        suites = {path: test_suites.load_suite(path) for path in evaluate.suites}
        echo(f"select: scoring {candidate.name} on {len(chosen)} validation examples")
        with loaded(candidate) as (model, tokenizer):
            conversations = [c for _, c in chosen]
            scores, replies = score_model(model, tokenizer, conversations, spec, schema)
            rows = [{"id": i, "reply": r} for (i, _), r in zip(chosen, replies, strict=True)]
            if select.few_shot:
                shot_scores, shot_replies = score_model(
                    model, tokenizer, [with_shots(c, shots) for c in conversations], spec, schema
                )
                scores |= {f"{FEW_SHOT}{name}": value for name, value in shot_scores.items()}
                rows = [row | {"few_shot_reply": r} for row, r in zip(rows, shot_replies, strict=True)]
            suite_rows = run_suites(model, tokenizer, suites, spec)
            speed = measure_speed(
                model, tokenizer, conversations[: select.speed_examples], spec.max_new_tokens
            )
            params = models.count_parameters(model)[1]
        for row in rows:
            writer.keep(row, "predictions.jsonl")
        if suites:
            scores["suite_pass_rate"] = test_suites.summarize(suite_rows)["pass_rate"]
        writer.stats = {
            "name": candidate.name,
            "model": candidate.spec.name,
            "examples": len(chosen),
            "few_shot_ids": shot_ids,
            "metrics": scores,
            "params": params,
            **speed,
        }
        if suites:
            writer.stats["suites"] = test_suites.summarize(suite_rows)

    return reuse_or_write(artifacts_dir, SELECT_CANDIDATE, digest, write, [splits])


def _validation_conversations(
    writer: StageWriter, splits: StageRef, limit: int | None
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(id, conversation up to its last reply) of each validation record scored; the rest dropped."""
    chosen = []
    for record in iter_records(splits, VALIDATION):
        writer.count_in()
        conversation = [models.clean_message(m) for m in record["messages"]]
        last = models.last_assistant_index(conversation)
        if last is None:
            writer.drop(
                {"id": record["id"]}, "no_assistant_turn", "messages: no assistant turn to compare with"
            )
        elif limit is not None and len(chosen) >= limit:
            writer.drop({"id": record["id"]}, "beyond_max_examples", f"select.max_examples is {limit}")
        else:
            chosen.append((record["id"], conversation[: last + 1]))
    return chosen


@contextmanager
def loaded(candidate: Candidate) -> Iterator[tuple[Any, Any]]:
    """The candidate's model and tokenizer, freed when done (the next candidate loads after)."""
    with candidate_errors(candidate.field):
        tokenizer = models.load_tokenizer(candidate.spec)
        model = models.load_spec(candidate.spec)
    try:
        yield model, tokenizer
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_speed(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]], max_new_tokens: int
) -> dict[str, float | None]:
    """Greedy replies one at a time, as a served model answers: tokens of the replies per second
    (re-tokenized text, the stop token not counted) and the mean latency per reply."""
    if not conversations:
        return {"tokens_per_second": None, "latency_ms": None}
    seconds, tokens = 0.0, 0
    for conversation in conversations:
        started = time.perf_counter()
        (reply,) = generate_replies(
            model, tokenizer, [conversation], max_new_tokens=max_new_tokens, batch_size=1
        )
        seconds += time.perf_counter() - started
        tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    return {
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
        "latency_ms": round(1000 * seconds / len(conversations), 1),
    }


def choose(rows: list[dict[str, Any]], select: SelectSpec, metric: str) -> int:
    """The index of the winning row; fills each row's `chosen` and `reason`.

    A row holds `name`, `metrics`, `params`, `train_memory_gb`, `tokens_per_second`, `latency_ms`.
    Raises UserError listing every candidate's figures when none is within the budget.
    """
    outside = {i: problems for i, row in enumerate(rows) if (problems := budget_problems(row, select))}
    inside = [i for i in range(len(rows)) if i not in outside]
    if not inside:
        raise UserError(no_candidate_message(rows, outside, metric))
    lower_is_better = metric.removeprefix(FEW_SHOT) == "loss"

    def rank(i: int) -> tuple[bool, float, int, int]:
        value = rows[i]["metrics"].get(metric)
        missing = not is_number(value)
        score = 0.0 if missing else (value if lower_is_better else -value)
        return missing, score, rows[i]["params"], i

    best = min(inside, key=rank)
    for i, row in enumerate(rows):
        row["chosen"] = i == best
        row["reason"] = "; ".join(outside[i]) if i in outside else _reason(rows, inside, i, best, metric)
    return best


def budget_problems(row: dict[str, Any], select: SelectSpec) -> list[str]:
    """Why a candidate is outside the budget (an unmeasured figure counts as outside), or []."""
    limits = (
        (
            "train_memory_gb",
            select.max_train_memory_gb,
            "select.max_train_memory_gb",
            max,
            "GiB train memory",
        ),
        ("tokens_per_second", select.min_tokens_per_second, "select.min_tokens_per_second", min, "tokens/s"),
        ("latency_ms", select.max_latency_ms, "select.max_latency_ms", max, "ms per reply"),
    )
    problems = []
    for key, limit, field, kind, unit in limits:
        value = row.get(key)
        if limit is None:
            continue
        if value is None or (value > limit if kind is max else value < limit):
            sign = ">" if kind is max else "<"
            problems.append(f"{value} {unit} {sign} {field} {limit}")
    return problems


def _reason(rows: list[dict[str, Any]], inside: list[int], i: int, best: int, metric: str) -> str:
    """Why a candidate within the budget won or lost."""
    value, top = rows[i]["metrics"].get(metric), rows[best]["metrics"].get(metric)
    if i == best:
        tied = [rows[j]["name"] for j in inside if j != i and rows[j]["metrics"].get(metric) == top]
        ties = f", tied with {', '.join(tied)}: fewer parameters" if tied else ""
        return f"best {metric} ({_show(top)}) within the budget{ties}"
    if value == top:
        return f"tied on {metric} ({_show(value)}) with {rows[best]['name']}, more parameters"
    return f"{metric} {_show(value)} vs {_show(top)} of {rows[best]['name']}"


def _show(value: Any) -> str:
    return f"{value:.4g}" if is_number(value) else "n/a"


def no_candidate_message(rows: list[dict[str, Any]], outside: dict[int, list[str]], metric: str) -> str:
    """Every candidate's figures and what put it outside the budget, and the fields to relax."""
    lines = [f"select: no candidate is within the budget of the `select` section ({len(rows)} scored):"]
    for i, row in enumerate(rows):
        lines.append(
            f"  {row['name']}: {metric} {_show(row['metrics'].get(metric))}, {row['params']:,} parameters, "
            f"{_show(row['train_memory_gb'])} GiB train memory, {_show(row['tokens_per_second'])} tokens/s, "
            f"{_show(row['latency_ms'])} ms per reply -- {'; '.join(outside[i])}"
        )
    fields = sorted(
        {problem.split(" select.")[1].split(" ")[0] for problems in outside.values() for problem in problems}
    )
    lines.append(
        f"relax select.{', select.'.join(fields)} (or remove it), or add a smaller or faster candidate"
    )
    return "\n".join(lines)


def run_select(
    artifacts_dir: str | Path,
    splits: StageRef,
    model: ModelSpec,
    select: SelectSpec,
    evaluate: EvaluateSpec,
    *,
    resolve: Callable[[ModelSpec], ModelSpec],
    train_memory: Callable[[ModelSpec], int],
    tracking: TrackingTarget | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[StageRef, ModelSpec]:
    """Score every candidate (cached one by one), apply the rule and return the select stage and
    the chosen model as later stages load it (`candidates` emptied: they key on it alone).

    `resolve` turns a candidate into a loadable model (GGUF: dequantized once), `train_memory`
    gives its training-memory estimate in bytes for the recipe's train section."""
    if not splits.file(VALIDATION).is_file() or next(iter_records(splits, VALIDATION), None) is None:
        raise UserError(
            "select: the validation split is empty, so model.candidates cannot be compared; "
            "set split.validation above 0 (e.g. 0.1) or remove model.candidates"
        )
    candidates = resolve_candidates(model, resolve)
    memory = []
    for candidate in candidates:
        with candidate_errors(candidate.field):
            memory.append(int(train_memory(candidate.spec)))
    scored = [score_candidate(artifacts_dir, c, splits, select, evaluate, echo) for c in candidates]
    metric = ranking_metric(select, evaluate)
    digest = select_key(scored, select, metric, memory)

    def write(writer: StageWriter) -> None:
        # The ledger of the validation records every candidate was scored on (the same for each).
        ledger = read_manifest(scored[0])["ledger"]
        writer.count_in(ledger["in"])
        writer.records_out = ledger["out"]
        writer.dropped.update(ledger["dropped"])
        writer.stats = selection_stats(candidates, scored, memory, select, metric)
        if tracking is not None:
            writer.stats["mlflow_run_id"] = log_selection(tracking, artifacts_dir, writer.stats)

    selected = find_stage(artifacts_dir, SELECT.name, digest) or reuse_or_write(
        artifacts_dir, SELECT, digest, write, scored
    )
    stats = read_stats(selected)
    index = stats["chosen_index"]
    echo(f"select: {stats['chosen']} chosen: {stats['candidates'][index]['reason']}")
    return selected, candidates[index].spec


def selection_stats(
    candidates: list[Candidate], scored: list[StageRef], memory: list[int], select: SelectSpec, metric: str
) -> dict[str, Any]:
    """The select stage's stats: a row per candidate, the chosen one and the rule."""
    rows = []
    for candidate, ref, size in zip(candidates, scored, memory, strict=True):
        stats = read_stats(ref)
        rows.append(
            {
                "name": candidate.name,
                "field": candidate.field,
                "model": candidate.spec.name,
                "metrics": stats["metrics"],
                "params": stats["params"],
                "train_memory_gb": round(size / GIB, 3),
                "tokens_per_second": stats["tokens_per_second"],
                "latency_ms": stats["latency_ms"],
                "chosen": False,
                "reason": "",
            }
        )
    best = choose(rows, select, metric)
    rule = {
        "metric": metric,
        "higher_is_better": metric.removeprefix(FEW_SHOT) != "loss",
        "few_shot": select.few_shot,
        "max_train_memory_gb": select.max_train_memory_gb,
        "min_tokens_per_second": select.min_tokens_per_second,
        "max_latency_ms": select.max_latency_ms,
        "tie_break": "fewer parameters",
    }
    return {"candidates": rows, "chosen": rows[best]["name"], "chosen_index": best, "rule": rule}


def selection_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates as table rows (Prefect artifact, MLflow table): one column per metric."""
    table = []
    for row in stats["candidates"]:
        metrics = {name: value for name, value in row["metrics"].items() if not name.endswith("perplexity")}
        table.append(
            {"name": row["name"], **metrics}
            | {key: row[key] for key in ("params", "train_memory_gb", "tokens_per_second", "latency_ms")}
            | {"chosen": row["chosen"], "why": row["reason"]}
        )
    return table


def log_selection(tracking: TrackingTarget, artifacts_dir: str | Path, stats: dict[str, Any]) -> str:
    """An MLflow run `select-<run name>`: the rule as params, the table and stats as artifacts, and
    a nested run per candidate with its figures as metrics. Returns the run id."""
    import mlflow

    experiment_id = open_experiment(tracking.tracking_uri, tracking.experiment, artifacts_dir)
    table = selection_table(stats)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"select-{tracking.run_name}") as run:
        mlflow.log_params(
            {f"select_{key}": value for key, value in stats["rule"].items()} | {"chosen": stats["chosen"]}
        )
        columns = {
            key: [row.get(key) for row in table] for key in dict.fromkeys(k for row in table for k in row)
        }
        mlflow.log_table(columns, artifact_file="select/candidates.json")
        mlflow.log_dict(stats, "select/stats.json")
        for row in stats["candidates"]:
            with mlflow.start_run(experiment_id=experiment_id, run_name=Path(row["name"]).name, nested=True):
                mlflow.log_params({"candidate": row["name"], "field": row["field"]})
                figures = row["metrics"] | {
                    k: row[k] for k in ("params", "train_memory_gb", "tokens_per_second", "latency_ms")
                }
                mlflow.log_metrics({key: float(value) for key, value in figures.items() if is_number(value)})
                mlflow.set_tags({"chosen": str(row["chosen"]).lower(), "reason": row["reason"]})
    return run.info.run_id
