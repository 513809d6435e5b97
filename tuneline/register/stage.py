"""The register stage: one MLflow run per trained model, a registered version, and the promotion rule.

The run holds the resolved recipe (flat params and `recipe.yaml`), the evaluation metrics (base
vs tuned), the training loss curve, the train/validation/test splits as dataset inputs (lineage),
and the model: the merged model folder of the train stage behind the pyfunc of `chat_model.py`,
logged "from code" (no pickled objects), because a peft model logged through `mlflow.transformers`
reloads with a randomly initialised base. The new version gets the `candidate` alias; it takes
`champion` only when it beats the current champion's metric by more than `register.margin`.
`registry.py` makes that decision once per version, under a lock; the decision, its reason and
the aliases this stage set go to the stage stats and to version tags.

Every step is safe to repeat: a re-run after a kill resumes the run tagged with this stage's
digest, logs nothing twice, reuses its logged model and completes its own version.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
from tuneline.experiment import is_number, open_experiment, prefixed_metrics, truncate_params

# isort: split
import mlflow
import mlflow.pyfunc
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException

from tuneline.pipeline import REGISTER, TRAIN, register_key
from tuneline.recipe import Recipe, dump_recipe, flatten_recipe
from tuneline.register.guardrails import Check, check_guardrails
from tuneline.register.registry import (
    DIGEST_TAG,
    Decision,
    acquire,
    create_version,
    find_version,
    registry_lock,
    settle_version,
)
from tuneline.report import lineage_funnel, side_by_side_row
from tuneline.store import StageRef, StageWriter, iter_records, read_stats, reuse_or_write

EXAMPLES_TABLE = "examples.json"
SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
# The model's code: MLflow copies this file into the model and runs it at load time.
CHAT_MODEL_FILE = Path(__file__).resolve().with_name("chat_model.py")
# MLflow's switch for unpickling a `python_model.pkl` at load time (on unless set).
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
# What the pyfunc needs at load time, besides tuneline itself (installed where it loads).
# Listed explicitly: inferred requirements add torchvision, which is not installed.
MODEL_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "safetensors",
    "pydantic",
    "pyyaml",
    "pandas",
)


def load_registered(model_uri: str, tracking_uri: str | None = None) -> Any:
    """A registered model as a pyfunc, e.g. `models:/support-bot@champion`. A version whose code
    is a pickle (registered before models were logged from code) is refused unless the caller
    sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    chosen = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = chosen or "false"
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        if chosen is None:
            del os.environ[PICKLE_SWITCH]


def run_register(
    artifacts_dir: str | Path,
    recipe: Recipe,
    splits: StageRef,
    trained: StageRef,
    evaluated: StageRef,
    evidence: Sequence[StageRef] = (),
) -> StageRef:
    """Log the run, register the merged model as this stage's version and apply the promotion rule
    and its guardrails. `evidence`: the stages after evaluate (benchmarks, judge, people's
    comparisons), whose figures are logged and read by the guardrails."""
    spec = recipe.register
    digest = register_key(recipe, splits, trained, evaluated, evidence)
    found = {"evaluate": read_stats(evaluated)} | {ref.stage: read_stats(ref) for ref in evidence}
    checks = check_guardrails(spec.guardrails, found)
    rescored = rescored_champion(found["evaluate"], spec.promote_metric)

    def write(writer: StageWriter) -> None:
        experiment_id = open_experiment(spec.tracking_uri, spec.experiment, artifacts_dir)
        client = mlflow.MlflowClient()
        metric = f"tuned_{spec.promote_metric}"
        started = time.perf_counter()
        trained_stats = read_stats(trained)
        run_id = reusable_run_id(client, trained_stats, experiment_id, digest)
        tags = {"tuneline.recipe_digest": recipe.digest(), DIGEST_TAG: digest}
        opened = (  # this stage's run, or the train stage's (its curves, log, params), or a new one
            mlflow.start_run(run_id=run_id)
            if run_id
            else mlflow.start_run(experiment_id=experiment_id, run_name=recipe.name, tags=tags)
        )
        with opened as run:  # FINISHED only once the version is complete
            mlflow.set_tags(tags)
            mlflow.log_params(truncate_params(flatten_recipe(recipe)))
            mlflow.log_text(dump_recipe(recipe), "recipe.yaml")
            mlflow.log_dict({"funnel": lineage_funnel(artifacts_dir, splits)}, "funnel.json")
            # The train stage's run logged the training numbers and curves itself.
            metrics = evaluation_metrics(found["evaluate"]) | evidence_metrics(found)
            metrics |= prefixed_metrics(trained_stats, TRAIN.name)
            curves = {} if run.info.run_id == trained_stats.get("mlflow_run_id") else trained_stats
            log_metrics_once(client, run.info.run_id, metrics, curves)
            log_split_inputs(splits)
            log_examples(client, run.info.run_id, evaluated)
            model_uri = logged_model_uri(experiment_id, digest) or log_chat_model(recipe, trained, digest)
            candidate = metrics.get(metric)
            model_version, decision = register_version(
                client, recipe, artifacts_dir, digest, trained, model_uri, candidate, rescored, checks
            )
            tag_ratings(client, spec.model_name, (found.get("compare") or {}).get("leaderboard") or [])
        writer.stats = {
            "tracking_uri": spec.tracking_uri,
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "run_url": run_url(spec.tracking_uri, experiment_id, run.info.run_id),
            "model_name": spec.model_name,
            "version": model_version,
            "model_uri": f"models:/{spec.model_name}/{model_version}",
            "metric": metric,
            "promoted": decision.promoted,
            "aliases": list(decision.aliases),  # set by this stage, at the time it decided
            "champion_version_before": decision.champion_before,
            "champion_metric_before": decision.champion_metric_before,
            "candidate_metric": metrics.get(metric),
            "reason": decision.reason,
            "champion_rescored": rescored is not None and rescored[0] == decision.champion_before,
            "guardrails": [asdict(check) for check in checks],
            "seconds": round(time.perf_counter() - started, 2),
        }

    return reuse_or_write(artifacts_dir, REGISTER, digest, write, [splits, trained, evaluated, *evidence])


def register_version(
    client: mlflow.MlflowClient,
    recipe: Recipe,
    artifacts_dir: str | Path,
    digest: str,
    trained: StageRef,
    model_uri: str,
    candidate: float | None,
    rescored: tuple[str, float | None] | None = None,
    checks: Sequence[Check] = (),
) -> tuple[str, Decision]:
    """This stage's version (found or created with its digest tag) and its decision, under the
    registry lock of the model name (`rescored`, `checks`: see registry.settle_version)."""
    spec = recipe.register
    with acquire(registry_lock(spec.tracking_uri, artifacts_dir, spec.model_name), spec.model_name):
        model_version = find_version(client, spec.model_name, digest) or create_version(
            model_uri, spec.model_name, {DIGEST_TAG: digest, "tuneline.train_digest": trained.digest}
        )
        decision = settle_version(
            client,
            spec.model_name,
            model_version,
            spec.promote_metric,
            candidate,
            spec.margin,
            rescored,
            checks,
        )
    return model_version, decision


def rescored_champion(evaluated: dict[str, Any], promote_metric: str) -> tuple[str, float | None] | None:
    """(champion version, its promote metric) as the evaluate stage scored it on this run's test
    split, or None when it scored no champion."""
    version = evaluated.get("champion_version")
    if version is None:
        return None
    return str(version), (evaluated.get("champion") or {}).get(promote_metric)


def tag_ratings(client: mlflow.MlflowClient, model_name: str, leaderboard: list[dict[str, Any]]) -> None:
    """People's ratings on every version they rated (`tuned:<train digest>` in the leaderboard of
    the compare stage): `tuneline.elo`, `tuneline.bt` and its 95% interval, `tuneline.rank`."""
    for rank, row in enumerate(leaderboard, start=1):
        if not str(row.get("model", "")).startswith("tuned:"):
            continue
        train_digest = row["model"].removeprefix("tuned:")
        query = f"name = '{model_name}' and tags.`tuneline.train_digest` = '{train_digest}'"
        for rated in client.search_model_versions(query):
            tags = {
                "tuneline.elo": f"{row['elo']:.0f}",
                "tuneline.bt": f"{row['bt']:.0f}",
                "tuneline.bt_ci": f"{row['ci_low']:.0f}-{row['ci_high']:.0f}",
                "tuneline.rank": f"{rank} of {len(leaderboard)}",
            }
            for key, value in tags.items():
                client.set_model_version_tag(model_name, rated.version, key, value)


def reusable_run_id(
    client: mlflow.MlflowClient, train_stats: dict[str, Any], experiment_id: str, digest: str | None = None
) -> str | None:
    """The MLflow run to log into: one an interrupted attempt of this register stage (`digest`)
    opened, else the run the train stage opened when it still exists (the store may have been
    wiped or changed since), lies in this experiment, and holds no other registration (a second
    one would change its params). Else None: start a new run."""
    if digest:
        found = client.search_runs([experiment_id], filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'")
        if found:
            return found[0].info.run_id
    run_id = train_stats.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return None if run.data.tags.get(DIGEST_TAG, digest) != digest else run_id


def log_metrics_once(
    client: mlflow.MlflowClient, run_id: str, metrics: dict[str, float], curves: dict[str, Any]
) -> None:
    """Log the metrics and curves in one batch (all or nothing), unless an earlier attempt did."""
    logged = client.get_run(run_id).data.metrics
    if not metrics or not set(metrics) <= set(logged):
        client.log_batch(run_id, metrics=to_metric_entities(metrics, curves))


def logged_model_uri(experiment_id: str, digest: str) -> str | None:
    """The model an interrupted attempt of this stage logged completely, or None."""
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'",
        output_format="list",
    )
    ready = [model for model in found if model.status == LoggedModelStatus.READY]
    return f"models:/{ready[0].model_id}" if ready else None


def evidence_metrics(found: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The figures of the stages after evaluate as metrics: `benchmark_arc_easy_base` and
    `_tuned` per benchmark, `judge_win_rate_vs_base`, `human_win_rate_vs_champion`, ..."""
    metrics = {}
    for task, row in ((found.get("benchmarks") or {}).get("tasks") or {}).items():
        metrics |= {f"benchmark_{task}_{side}": row.get(side) for side in ("base", "tuned")}
    for stage, rater in (("judge", "judge"), ("compare", "human")):
        for opponent, row in ((found.get(stage) or {}).get("pairs") or {}).items():
            metrics[f"{rater}_win_rate_vs_{opponent}"] = (row or {}).get("win_rate")
    return {key: float(value) for key, value in metrics.items() if is_number(value)}


def log_examples(client: mlflow.MlflowClient, run_id: str, evaluated: StageRef) -> None:
    """The test examples side by side (prompt, reference, base, tuned, champion) as the run's
    `examples.json` table, unless an earlier attempt logged it (MLflow appends to a table)."""
    if any(item.path == EXAMPLES_TABLE for item in client.list_artifacts(run_id)):
        return
    rows = [side_by_side_row(row) for row in iter_records(evaluated, "predictions.jsonl")]
    if rows:
        columns = {key: [row.get(key) for row in rows] for key in rows[0]}
        mlflow.log_table(columns, artifact_file=EXAMPLES_TABLE)


def evaluation_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """`base_loss`, `tuned_rouge_l`, `tuned_suite_pass_rate`, ... from the evaluate stage, and
    each suite assertion kind's pass rate (`tuned_suite_regex_pass_rate`); missing values are
    skipped."""
    metrics = {"eval_examples": stats.get("examples")}
    suites = stats.get("suites") or {}
    for side in ("base", "tuned", "champion"):
        metrics |= {f"{side}_{name}": value for name, value in (stats.get(side) or {}).items()}
        by_kind = (suites.get(side) or {}).get("by_kind") or {}
        metrics |= {f"{side}_suite_{kind}_pass_rate": e.get("pass_rate") for kind, e in by_kind.items()}
    return {key: float(value) for key, value in metrics.items() if is_number(value)}


def to_metric_entities(metrics: dict[str, float], train_stats: dict[str, Any]) -> list[Metric]:
    """The run's metrics plus the loss curve (`loss`, `learning_rate` by step), for one batch call."""
    now = int(time.time() * 1000)
    entities = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for row in train_stats.get("log_history") or []:
        for key in ("loss", "learning_rate"):
            if is_number(row.get(key)):
                entities.append(Metric(key, float(row[key]), now, int(row["step"])))
    return entities


def log_split_inputs(splits: StageRef) -> None:
    """Dataset lineage: each split as a dataset input named after it, with the split stage's digest,
    its file as source and MLflow's context (training, validation, testing)."""
    import pandas as pd

    for split, context in SPLIT_CONTEXTS.items():
        path = splits.file(f"{split}.jsonl")
        frame = pd.DataFrame(list(iter_records(splits, path.name)), columns=["id", "messages", "tools"])
        with warnings.catch_warnings():  # a local path matches two registered source types alike
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(path), name=split, digest=splits.digest)
        mlflow.log_input(dataset, context=context)


def log_chat_model(recipe: Recipe, trained: StageRef, digest: str) -> str:
    """Log the merged model folder with `chat_model.py` as its code (no pickle, no bundled
    package) into the active run, tagged with the stage digest; returns the model's URI."""
    from tuneline import models

    folder = models.trained_folder(trained.dir)
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder}: the train stage has no merged model or adapter (config.json missing); "
            f"delete {trained.path} so that training runs again"
        )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(CHAT_MODEL_FILE),
        artifacts={"model": str(folder)},
        pip_requirements=model_requirements(),
        model_config={
            "max_new_tokens": recipe.evaluate.max_new_tokens,
            "batch_size": recipe.evaluate.batch_size,
        },
        tags={DIGEST_TAG: digest},
    )
    return info.model_uri


def model_requirements() -> list[str]:
    """Pinned requirements of the pyfunc, from the installed versions; a local build tag such as
    torch's `+cpu` is dropped, so a CUDA build of the same version satisfies it."""
    pins = []
    for package in MODEL_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run shows in the MLflow UI (for a local store: after `tuneline ui` or `mlflow ui`)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
