"""The benchmarks stages: lm-evaluation-harness tasks on the base and the tuned model, side by side.

`evaluate.benchmarks` names lm-eval tasks (arc_easy, hellaswag, truthfulqa_mc2,
mmlu_computer_security, a group with an aggregate such as mmlu, or a task of the user's own YAML
under `include_path`). One model on one task is a `benchmark` stage, keyed on the model's content
(the base: its base_model stage or its files, or its hub name; the tuned: its train stage), the
task, limit and few-shot, the content of its data files and task YAMLs, the lm-eval version and
this code. So the base model's scores are computed once and every later run reuses them. The
`benchmarks` stage then sets both sides of each task in one table with the change (stats `tasks`,
shares 0..1), which the register stage logs and its `max_regression` guardrail reads: the "did
fine-tuning make it forget" check.

A hub task runs offline from local files in the hub dataset's column layout: `data_files`
replaces its dataset with the `json` loader over those files, through lm-eval's own config
override (an inline group that lists the task with the changed fields, as a task YAML would).
Every task is built, its name checked and its data read, before a model loads; then each side's
model loads once (tuneline.models, as the evaluate stage loads it), is wrapped in lm-eval's HFLM
(`pretrained=<the model object>`, so lm-eval never loads it again) and runs all of that side's
tasks that are not cached.

Nothing here imports torch or lm-eval at import time: a run whose stages are all cached pays for
neither.
"""

from __future__ import annotations

import difflib
import gc
import json
import time
from functools import cache, partial
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneline.errors import UserError
from tuneline.pipeline import BASE_MODEL, BENCHMARK, BENCHMARKS, benchmark_key, benchmarks_key
from tuneline.recipe import BenchmarkSpec, EvaluateSpec, ModelSpec
from tuneline.store import (
    MANIFEST,
    StageRef,
    StageWriter,
    files_digest,
    find_stage,
    folder_key,
    read_stats,
    reuse_or_write,
)

SAMPLES = "samples.jsonl"  # one row per scored document: its target, scores and the model's responses
RESULTS = "results.json"  # lm-eval's own results, configs, versions and sample counts for the task
TABLE = "benchmarks.jsonl"  # the benchmarks stage: one row per task, base vs tuned
# The task config fields that name a split; `data_files` keys must be among their values.
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")
# The metric compared when the recipe names none: the first of these the task reports.
PREFERRED_METRICS = ("acc_norm", "acc")


def run_benchmarks(
    artifacts_dir: str | Path, trained: StageRef, model: ModelSpec, evaluate: EvaluateSpec
) -> StageRef:
    """Score the base and the tuned model on every `evaluate.benchmarks` task (each side and task
    cached on its own) and write the side-by-side table; cached on those stages and the metrics."""
    benchmarks = evaluate.benchmarks
    lm_eval = lm_eval_version()
    data = [data_digest(benchmark, index) for index, benchmark in enumerate(benchmarks)]
    model_ids = {"base": model_identity(artifacts_dir, model), "tuned": f"train:{trained.digest}"}
    keys = {
        side: [benchmark_key(model_id, b, d, lm_eval) for b, d in zip(benchmarks, data, strict=True)]
        for side, model_id in model_ids.items()
    }

    def write(writer: StageWriter) -> None:
        specs = {"base": model, "tuned": tuned_spec(model, trained)}
        scored = {
            side: score_side(artifacts_dir, specs[side], benchmarks, keys[side], evaluate.batch_size)
            for side in ("base", "tuned")
        }
        writer.count_in(len(benchmarks))
        rows = compare(benchmarks, scored["base"], scored["tuned"])
        for row in rows:
            writer.keep(row, TABLE)
        writer.stats = {
            "tasks": {row["task"]: {k: v for k, v in row.items() if k != "task"} for row in rows},
            "lm_eval": lm_eval,
            "stages": {side: [ref.digest for ref in refs] for side, refs in scored.items()},
        }

    digest = benchmarks_key([*keys["base"], *keys["tuned"]], benchmarks)
    return reuse_or_write(artifacts_dir, BENCHMARKS, digest, write, [trained])


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version (its task definitions decide the scores)."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise UserError(
            "evaluate.benchmarks needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13', "
            "or remove evaluate.benchmarks from the recipe"
        ) from None


def model_identity(artifacts_dir: str | Path, spec: ModelSpec) -> str:
    """What a base model's scores are keyed on: the base_model stage a dequantized GGUF folder lives
    in, another local folder's files by content, or a hub name with its revision."""
    folder = Path(spec.name)
    if not folder.is_dir():
        return f"hub:{spec.name}@{spec.revision or 'default'}"
    stage_dir = folder.resolve().parent
    if stage_dir.parent.name == BASE_MODEL.name and (stage_dir / MANIFEST).is_file():
        return f"{BASE_MODEL.name}:{stage_dir.name}"
    return folder_key(artifacts_dir, folder)


def data_digest(benchmark: BenchmarkSpec, index: int) -> str | None:
    """The content of a benchmark's data files (by split) and of its include_path folder's files:
    editing one re-runs the task. A missing file is a UserError naming the recipe field."""
    field = f"evaluate.benchmarks[{index}]"
    parts: dict[str, Any] = {}
    for split, path in sorted(benchmark.data_files.items()):
        if not Path(path).is_file():
            raise UserError(
                f"{field}.data_files.{split}: file {path} not found (paths are relative to the project "
                f"folder, {Path.cwd()}); fix the path"
            )
        parts[split] = files_digest(path)
    if benchmark.include_path is not None:
        folder = Path(benchmark.include_path)
        if not folder.is_dir():
            raise UserError(
                f"{field}.include_path: folder {folder} not found (paths are relative to the project "
                f"folder, {Path.cwd()}); give the folder that holds your task YAML files"
            )
        files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        parts["include_path"] = [(p.relative_to(folder).as_posix(), files_digest(p)) for p in files]
    return json.dumps(parts, sort_keys=True) if parts else None


def tuned_spec(model: ModelSpec, trained: StageRef) -> ModelSpec:
    """The tuned model as the evaluate stage loads it: the train stage's model or adapter folder."""
    from tuneline import models

    return ModelSpec(
        name=str(models.trained_folder(trained.dir)),
        trust_remote_code=model.trust_remote_code,
        allow_pickle_weights=model.allow_pickle_weights,  # a soft-prompt adapter loads its base
    )


def score_side(
    artifacts_dir: str | Path,
    spec: ModelSpec,
    benchmarks: list[BenchmarkSpec],
    digests: list[str],
    batch_size: int,
) -> list[StageRef]:
    """One model's `benchmark` stages, one per task: the cached ones found, the others built first
    (names and data checked), then run on the model loaded once."""
    found = [find_stage(artifacts_dir, BENCHMARK.name, digest) for digest in digests]
    todo = [index for index, ref in enumerate(found) if ref is None]
    if not todo:
        return found
    manager = task_manager(
        tuple(dict.fromkeys(b.include_path for b in benchmarks if b.include_path)),
        tuple(benchmarks[index].task for index in todo),
    )
    for index in todo:  # every name first: a typo in the last task fails before the first loads data
        check_task_name(manager, benchmarks[index], index)
    built = {index: build_task(manager, benchmarks[index], index) for index in todo}
    lm = wrap_model(spec, batch_size)
    try:
        for index in todo:
            run = partial(
                write_scores, lm=lm, manager=manager, built=built[index], benchmark=benchmarks[index]
            )
            found[index] = reuse_or_write(artifacts_dir, BENCHMARK, digests[index], run)
    finally:
        del lm
        gc.collect()
    return found


def check_benchmarks(benchmarks: list[BenchmarkSpec]) -> None:
    """Check every benchmark's task name against lm-eval's index (about 6 s with lm-eval's own
    tasks), so a typo stops the run before training, not after."""
    if not benchmarks:
        return
    include_paths = tuple(dict.fromkeys(b.include_path for b in benchmarks if b.include_path))
    manager = task_manager(include_paths, tuple(b.task for b in benchmarks))
    for index, benchmark in enumerate(benchmarks):
        check_task_name(manager, benchmark, index)


def task_manager(include_paths: tuple[str, ...], names: tuple[str, ...]) -> Any:
    """lm-eval's task index: of the user's folders alone when they define every task named (fast),
    else with lm-eval's own ~15,000 tasks too (about 6 s to index; kept for the process)."""
    if include_paths:
        own = _task_manager(include_paths, False)
        if all(name in own.task_index and name not in own.all_tags for name in names):
            return own
    return _task_manager(include_paths, True)


@cache
def _task_manager(include_paths: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)


def check_task_name(manager: Any, benchmark: BenchmarkSpec, index: int) -> None:
    """A UserError naming the recipe field unless the benchmark names one task or group lm-eval
    knows (a tag of several tasks has no score of its own)."""
    field, name = f"evaluate.benchmarks[{index}]", benchmark.task
    if name not in manager.task_index:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"{field}.task: {name!r} is not a task lm-eval {lm_eval_version()} knows{hint}; use a name "
            "that `lm-eval ls tasks` lists, or define the task in a YAML file under include_path"
        )
    if name in manager.all_tags:
        raise UserError(
            f"{field}.task: {name!r} is a tag of several tasks without one score; list its tasks one by one"
        )


def build_task(manager: Any, benchmark: BenchmarkSpec, index: int) -> Any:
    """The lm-eval Task (or Group) a benchmark names, its data loaded: from `data_files` when given.
    Data that does not fit the task or cannot load is a UserError naming the recipe field."""
    field, name = f"evaluate.benchmarks[{index}]", benchmark.task
    group = name in manager.all_groups
    spec: str | dict[str, Any] = name
    if benchmark.data_files:
        if group:
            raise UserError(
                f"{field}.data_files: {name!r} is a group of tasks, each with its own data; list the "
                f"tasks you have files for (e.g. {name}_<subtask>) with their data_files"
            )
        overrides = offline_fields(manager.task_index[name].cfg or {}, benchmark, field)
        spec = {"group": f"tuneline:{name}", "task": [{"task": name, **overrides}]}
    try:
        loaded = manager.load(spec)
    except Exception as error:  # noqa: BLE001 - lm-eval and datasets raise anything; the user must see why
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = "" if benchmark.data_files else f"; to run it offline give {field}.data_files"
        raise UserError(f"{field}: lm-eval could not build task {name!r} ({detail}){offline}") from None
    return loaded["groups"][name] if group else loaded["tasks"][name]


def offline_fields(config: dict[str, Any], benchmark: BenchmarkSpec, field: str) -> dict[str, Any]:
    """The task config fields that read `data_files` with the json loader: the splits the files do
    not provide are unset, so lm-eval evaluates (and samples few-shot examples from) what is there."""
    splits = {key: config[key] for key in SPLIT_FIELDS if config.get(key)}
    given = set(benchmark.data_files)
    evaluated = {splits.get("test_split"), splits.get("validation_split")} - {None}
    if given - set(splits.values()) or not given & evaluated:
        reads = ", ".join(f"{key}: {split}" for key, split in splits.items())
        raise UserError(
            f"{field}.data_files: task {benchmark.task} scores the split {' or '.join(sorted(evaluated))} "
            f"({reads}), but data_files names {', '.join(sorted(given))}; key each file by one of the "
            f"task's splits, e.g. {{{sorted(evaluated)[0]}: path/to/file.jsonl}}"
        )
    data_files = {split: str(Path(path).resolve()) for split, path in benchmark.data_files.items()}
    fields: dict[str, Any] = {key: None for key, split in splits.items() if split not in given}
    return fields | {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }


def wrap_model(spec: ModelSpec, batch_size: int) -> Any:
    """Load the model and its tokenizer once (as the evaluate stage does) inside lm-eval's HFLM."""
    from lm_eval.models.huggingface import HFLM

    from tuneline import models

    tokenizer = models.load_tokenizer(spec)
    model = models.load_spec(spec)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def write_scores(writer: StageWriter, *, lm: Any, manager: Any, built: Any, benchmark: BenchmarkSpec) -> None:
    """Run one task on the wrapped model: every scored document in samples.jsonl (the ledger counts
    them), lm-eval's results in results.json, the task's metrics with their stderr in the stats."""
    started = time.perf_counter()
    result = evaluate_task(lm, manager, built, benchmark)
    for task_name, samples in sorted(result["samples"].items()):
        for sample in samples:
            writer.count_in()
            writer.keep(_plain(sample_row(task_name, sample)), SAMPLES)
    kept = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "n-samples")
    results = {key: result[key] for key in kept if key in result}
    writer.path(RESULTS).write_text(json.dumps(_plain(results), indent=2), encoding="utf-8")
    name = benchmark.task
    leaves = result["n-samples"]
    writer.stats = {
        "task": name,
        "metrics": task_scores(result["results"].get(name) or result.get("groups", {}).get(name, {})),
        "n": sum(counts["effective"] for counts in leaves.values()),
        "limit": benchmark.limit,
        "num_fewshot": _one_or_all(result["n-shot"].values()),
        "subtasks": {leaf: task_scores(result["results"][leaf]) for leaf in leaves if leaf != name},
        "seconds": round(time.perf_counter() - started, 1),
        "lm_eval": lm_eval_version(),
    }


def evaluate_task(lm: Any, manager: Any, built: Any, benchmark: BenchmarkSpec) -> dict[str, Any]:
    """lm-eval's `evaluate` on one built task with what `simple_evaluate` (and so the `lm-eval`
    command) sets first: its seeds, the few-shot count (a task whose config fixes 0 keeps it) and the
    few-shot sampler's seed. `simple_evaluate` itself also collects environment info for its report,
    spawning `pip list` and friends: about a second per call, for each task and model."""
    import random

    import numpy as np
    import torch
    from lm_eval import evaluate
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load([built])
    for task in loaded["tasks"].values():
        configured = task.get_config("num_fewshot")
        if benchmark.num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=benchmark.num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=benchmark.limit, log_samples=True)


def sample_row(task_name: str, sample: dict[str, Any]) -> dict[str, Any]:
    """What samples.jsonl keeps of one lm-eval sample: which document, its target, each metric's
    value and the model's filtered responses (log-likelihood and greedy flag per choice)."""
    return {
        "task": task_name,
        "doc_id": sample["doc_id"],
        "target": sample["target"],
        "scores": {metric: sample.get(metric) for metric in sample["metrics"]},
        "responses": sample["filtered_resps"],
    }


def task_scores(row: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's `metric,filter` result keys as {metric: {value, stderr}}; the filter joins the name
    only where it is not `none` (`exact_match,strict-match`)."""
    scores = {}
    for key, value in row.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr"):
            continue
        name = metric if filter_name == "none" else key
        scores[name] = {"value": _number(value), "stderr": _number(row.get(f"{metric}_stderr,{filter_name}"))}
    return scores


def compare(
    benchmarks: list[BenchmarkSpec], base: list[StageRef], tuned: list[StageRef]
) -> list[dict[str, Any]]:
    """One row per task: the compared metric, base and tuned scores (shares) with their stderr, the
    change (tuned - base), the limit, the documents scored and the few-shot count."""
    rows = []
    for index, (benchmark, base_ref, tuned_ref) in enumerate(zip(benchmarks, base, tuned, strict=True)):
        base_stats, tuned_stats = read_stats(base_ref), read_stats(tuned_ref)
        metric = headline_metric(benchmark, base_stats["metrics"], index)
        before, after = base_stats["metrics"][metric], tuned_stats["metrics"].get(metric, {})
        base_value, tuned_value = before.get("value"), after.get("value")
        change = tuned_value - base_value if base_value is not None and tuned_value is not None else None
        rows.append(
            {
                "task": benchmark.task,
                "metric": metric,
                "base": base_value,
                "tuned": tuned_value,
                "change": change,
                "base_stderr": before.get("stderr"),
                "tuned_stderr": after.get("stderr"),
                "limit": benchmark.limit,
                "n": base_stats["n"],
                "num_fewshot": base_stats["num_fewshot"],
            }
        )
    return rows


def headline_metric(benchmark: BenchmarkSpec, metrics: dict[str, Any], index: int) -> str:
    """The metric compared: the recipe's `metric`, else acc_norm, else acc, else the task's first."""
    field = f"evaluate.benchmarks[{index}]"
    if benchmark.metric is not None:
        if benchmark.metric not in metrics:
            raise UserError(
                f"{field}.metric: task {benchmark.task} reports {', '.join(metrics) or 'no metric'}, not "
                f"{benchmark.metric!r}; name one of those, or leave metric out"
            )
        return benchmark.metric
    if not metrics:
        raise UserError(
            f"{field}.task: {benchmark.task} reported no score of its own (a group without an aggregate "
            "metric); list its tasks one by one"
        )
    return next((name for name in PREFERRED_METRICS if name in metrics), next(iter(metrics)))


def table_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmarks stage's stats as the table the run shows: scores and change in points."""
    rows = []
    for task, row in stats["tasks"].items():
        rows.append(
            {
                "task": task,
                "metric": row["metric"],
                "base": _points(row["base"], row["base_stderr"]),
                "tuned": _points(row["tuned"], row["tuned_stderr"]),
                "change": "n/a" if row["change"] is None else f"{100 * row['change']:+.1f}",
                "n": row["n"],
            }
        )
    return rows


def _one_or_all(values: Any) -> Any:
    """The few-shot count of a task (a group's subtasks may differ: then each distinct count)."""
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else distinct


def _points(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def _number(value: Any) -> float | None:
    """A result value as a float; lm-eval writes "N/A" where it has none (a stderr not computed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _plain(value: Any) -> Any:
    """lm-eval's results as JSON data: numpy scalars become numbers, functions and tuples what
    json makes of them (their text, lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
