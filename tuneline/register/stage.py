"""The register stage: one MLflow run per trained model, a registered version, and the promotion rule.

The run holds the resolved recipe (flat params and `recipe.yaml`), the evaluation metrics (base
vs tuned), the training loss curve, the train/validation/test splits as dataset inputs (lineage),
and the model: a pyfunc wrapping the *merged* model folder of the train stage, because a peft
model logged through `mlflow.transformers` reloads with a randomly initialised base. The new
version gets the `candidate` alias; it takes `champion` only when it beats the current champion's
metric by more than `register.margin`. The decision and its reason go to the stage stats and to
version tags.
"""

from __future__ import annotations

import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
from tuneline.experiment import is_number, open_experiment, prefixed_metrics, truncate_params

# isort: split
import mlflow
import mlflow.pyfunc
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from tuneline.pipeline import REGISTER, TRAIN, register_key
from tuneline.recipe import ModelSpec, Recipe, dump_recipe, flatten_recipe
from tuneline.report import lineage_funnel
from tuneline.store import StageRef, StageWriter, iter_records, read_stats, reuse_or_write

CANDIDATE = "candidate"
CHAMPION = "champion"
SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
LOWER_IS_BETTER = {"loss"}
# What the pyfunc needs at load time; tuneline itself travels with the model as code_paths.
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


class TunelineChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat replies from the merged model folder logged as the `model` artifact.

    MLflow requires a PythonModel subclass; this is the only one. Generation settings come from
    the `model_config` logged with the model (the recipe's evaluate section).
    """

    def load_context(self, context: Any) -> None:
        """Load the tokenizer and model once, when MLflow loads the registered model."""
        from tuneline import models

        folder = context.artifacts["model"]
        self.tokenizer = models.load_tokenizer(ModelSpec(name=folder))
        self.model = models.load_trained(folder)  # a merged model, or a soft-prompt adapter on its base
        self.max_new_tokens = int(context.model_config["max_new_tokens"])
        self.batch_size = int(context.model_config["batch_size"])

    def predict(self, context: Any, model_input: list[list[dict[str, str]]], params: Any = None) -> list[str]:
        """One greedy reply per conversation (a list of {role, content}); a pandas DataFrame with a
        `messages` column is accepted too. A conversation ending on the user is answered; a final
        assistant turn is regenerated (the same prompt as evaluation used)."""
        from tuneline.evaluate.stage import generate_replies

        if hasattr(model_input, "columns"):
            model_input = model_input["messages"].tolist()
        conversations = [[dict(turn) for turn in conversation] for conversation in model_input]
        return generate_replies(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )


def load_registered(model_uri: str, tracking_uri: str | None = None) -> Any:
    """A registered model as a pyfunc, e.g. `models:/support-bot@champion`."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def run_register(
    artifacts_dir: str | Path, recipe: Recipe, splits: StageRef, trained: StageRef, evaluated: StageRef
) -> StageRef:
    """Log the run, register the merged model as a new version and apply the promotion rule."""
    spec = recipe.register
    digest = register_key(recipe, splits, trained, evaluated)

    def write(writer: StageWriter) -> None:
        experiment_id = open_experiment(spec.tracking_uri, spec.experiment, artifacts_dir)
        client = mlflow.MlflowClient()
        champion = champion_version(client, spec.model_name)
        metric = f"tuned_{spec.promote_metric}"
        started = time.perf_counter()
        trained_stats = read_stats(trained)
        reused = reusable_run_id(client, trained_stats, experiment_id)
        opened = (
            mlflow.start_run(run_id=reused)  # the train stage's run: its curves, log and params
            if reused
            else mlflow.start_run(experiment_id=experiment_id, run_name=recipe.name)
        )
        with opened as run:
            mlflow.set_tags({"tuneline.recipe_digest": recipe.digest(), "tuneline.stage_digest": digest})
            mlflow.log_params(truncate_params(flatten_recipe(recipe)))
            mlflow.log_text(dump_recipe(recipe), "recipe.yaml")
            mlflow.log_dict({"funnel": lineage_funnel(artifacts_dir, splits)}, "funnel.json")
            # A reused train run logged the training numbers and curves itself.
            metrics = evaluation_metrics(read_stats(evaluated)) | prefixed_metrics(trained_stats, TRAIN.name)
            curves = {} if reused else trained_stats
            client.log_batch(run.info.run_id, metrics=to_metric_entities(metrics, curves))
            log_split_inputs(splits)
            info = log_chat_model(recipe, trained)
        model_version = str(info.registered_model_version)
        client.set_registered_model_alias(spec.model_name, CANDIDATE, model_version)
        before = champion_metric(client, spec.model_name, champion, metric)
        candidate = metrics.get(metric)
        promoted, reason = decide_promotion(spec.promote_metric, candidate, before, spec.margin, champion)
        if promoted:
            client.set_registered_model_alias(spec.model_name, CHAMPION, model_version)
        for key, value in {"promoted": str(promoted).lower(), "reason": reason, "metric": metric}.items():
            client.set_model_version_tag(spec.model_name, model_version, f"tuneline.{key}", value)
        writer.stats = {
            "tracking_uri": spec.tracking_uri,
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "run_url": run_url(spec.tracking_uri, experiment_id, run.info.run_id),
            "model_name": spec.model_name,
            "version": model_version,
            "model_uri": f"models:/{spec.model_name}/{model_version}",
            "metric": metric,
            "promoted": promoted,
            "champion_version_before": champion,
            "champion_metric_before": before,
            "candidate_metric": candidate,
            "reason": reason,
            "seconds": round(time.perf_counter() - started, 2),
        }

    return reuse_or_write(artifacts_dir, REGISTER, digest, write, [splits, trained, evaluated])


def reusable_run_id(
    client: mlflow.MlflowClient, train_stats: dict[str, Any], experiment_id: str
) -> str | None:
    """The MLflow run the train stage opened, when the register stage can log into it: it still
    exists (the store may have been wiped or changed since), lies in this experiment, and holds
    no registration yet (a second one would change its params). Else None: start a new run."""
    run_id = train_stats.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return None if "tuneline.stage_digest" in run.data.tags else run_id


def champion_version(client: mlflow.MlflowClient, model_name: str) -> str | None:
    """The version holding the `champion` alias, or None (also when the model is not registered yet)."""
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    champion = registered.aliases.get(CHAMPION)  # an int in MLflow 3, a string elsewhere
    return None if champion is None else str(champion)


def champion_metric(
    client: mlflow.MlflowClient, model_name: str, champion: str | None, metric: str
) -> float | None:
    """The champion's metric, read from the run that logged the champion version."""
    if champion is None:
        return None
    run_id = client.get_model_version(model_name, champion).run_id
    return client.get_run(run_id).data.metrics.get(metric) if run_id else None


def decide_promotion(
    metric: str, candidate: float | None, champion: float | None, margin: float, champion_ver: str | None
) -> tuple[bool, str]:
    """Whether the candidate takes `champion`, and why. Higher is better except for loss."""
    if champion_ver is None:
        return True, "no champion yet"
    if candidate is None:
        return False, f"the candidate has no tuned_{metric} (evaluation gave no finite value)"
    if champion is None:
        return False, f"champion version {champion_ver} has no tuned_{metric}; move the alias by hand"
    gain = champion - candidate if metric in LOWER_IS_BETTER else candidate - champion
    beats = gain - margin > 1e-9  # 0.55 - 0.5 is 0.05000000000000004: not *more* than a 0.05 margin
    verdict = "beats" if beats else "does not beat"
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    return beats, (
        f"tuned_{metric} {candidate:.4g} vs champion v{champion_ver} {champion:.4g} ({direction} is better): "
        f"{verdict} it by more than the margin {margin:g}"
    )


def evaluation_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """`base_loss`, `tuned_exact_match`, ... from the evaluate stage; missing values are skipped."""
    metrics = {"eval_examples": stats.get("examples")}
    for side in ("base", "tuned"):
        metrics |= {f"{side}_{name}": value for name, value in (stats.get(side) or {}).items()}
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


def log_chat_model(recipe: Recipe, trained: StageRef) -> Any:
    """Log the merged model folder as a TunelineChatModel pyfunc and register it as a new version."""
    from tuneline import models

    folder = models.trained_folder(trained.dir)
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder}: the train stage has no merged model or adapter (config.json missing); "
            f"delete {trained.path} so that training runs again"
        )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TunelineChatModel(),
        artifacts={"model": str(folder)},
        code_paths=[str(Path(__file__).resolve().parent)],  # tuneline itself, so the model loads anywhere
        pip_requirements=model_requirements(),
        model_config={
            "max_new_tokens": recipe.evaluate.max_new_tokens,
            "batch_size": recipe.evaluate.batch_size,
        },
        registered_model_name=recipe.register.model_name,
    )


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
