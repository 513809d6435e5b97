"""One Prefect task per stage. Each sets retries and reporting, then calls one core function.

Caching is content-addressed in the artifact store: a stage whose digest (recipe section,
inputs, code) already has a finished folder returns it at once. That survives a reset of
Prefect's database and never returns a reference to a deleted folder, so Prefect's own
result cache is left off (`NO_CACHE`) rather than kept as a second, weaker copy.

The train, evaluate and register tasks look their finished stage up by its digest first, and
import their core modules only when there is work: those pull in torch, peft, the trainer and
MLflow (~5-10 s), which a cached re-run, a flow that stops before training (the `augment` flow,
a failed gate) or a worker that only imports the flow should not pay for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL
from prefect.tasks import exponential_backoff
from tuneline.flows.server import data_docs_url, recorded_server

from tuneline.augment.teacher import TeacherUnreachable
from tuneline.curate.clean import run_clean
from tuneline.curate.gate import run_gate
from tuneline.curate.split import run_split
from tuneline.evaluate.benchmarks import check_benchmarks, run_benchmarks, table_rows
from tuneline.evaluate.judge import judge_table, load_rubric, run_judge
from tuneline.experiment import TrackingTarget
from tuneline.pipeline import (
    BASE_MODEL,
    BENCHMARKS,
    CLEAN,
    COLLECT,
    EVALUATE,
    FETCH,
    GATE,
    JUDGE,
    PRETRAIN,
    REGISTER,
    SELECT,
    SPLIT,
    TRAIN,
    evaluate_key,
    pretrain_key,
    register_key,
    train_key,
)  # fmt: skip
from tuneline.recipe import (
    CleanSpec,
    EvaluateSpec,
    GateSpec,
    JudgeSpec,
    ModelSpec,
    PretrainSpec,
    Recipe,
    RegisterSpec,
    SelectSpec,
    Source,
    SplitSpec,
    TeacherSpec,
    TrainSpec,
)
from tuneline.report import (
    build_report,
    format_dropped,
    render_markdown,
    save_run_recipe,
    side_by_side_row,
    write_report,
)
from tuneline.sources.collect import SourceUnreachable, run_collect
from tuneline.sources.fetch import run_fetch
from tuneline.store import StageRef, find_stage, iter_records, read_stats, remove_stale_temporaries
from tuneline.train.layout import CURVE_FILE, LOG_FILE, image_data_url, training_markdown

# How many test examples the run shows side by side (all of them are in predictions.jsonl).
EXAMPLES_SHOWN = 20


def retry_network_errors(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's hook signature)
    """Retry what a second try can fix (an unreachable source or teacher), never a user's mistake."""
    try:
        state.result()
    except (SourceUnreachable, TeacherUnreachable):
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


def teacher_api_key(teacher: TeacherSpec) -> str | None:
    """The key of a teacher (or judge) endpoint from the Prefect Secret block the recipe names; None
    leaves the core to read the environment variable `api_key_env`."""
    if not teacher.api_key_secret:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(teacher.api_key_secret).get()


def network_retries(backoff_factor: float) -> dict[str, Any]:
    """The retry settings of a stage that reaches a network: three more tries with exponential
    backoff (`backoff_factor` seconds, doubling), for what `retry_network_errors` says is worth it."""
    return {
        "retries": 3,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_factor),
        "retry_condition_fn": retry_network_errors,
    }


@task(
    name=FETCH.name,
    task_run_name="fetch-{source.name}",
    **network_retries(backoff_factor=2),
    cache_policy=NO_CACHE,
)
def fetch(artifacts_dir: Path, source: Source, refresh: str | None = None) -> StageRef:
    """Download, crawl or load one source into its own cached stage folder; `refresh` (only the
    refresh flow passes it) crawls again and re-downloads what no validator vouches for."""
    return run_fetch(artifacts_dir, source, refresh)


@task(
    name=COLLECT.name,
    **network_retries(backoff_factor=2),
    cache_policy=NO_CACHE,
)
def collect(artifacts_dir: Path, sources: list[Source], fetched: list[StageRef] | None = None) -> StageRef:
    """Merge the fetched sources into records and documents; show per-source counts in the UI."""
    collected = run_collect(artifacts_dir, sources, fetched)
    rows = [
        {
            "source": name,
            "kind": counts["kind"],
            "records": counts["records"],
            "documents": counts["documents"],
            "dropped": format_dropped(counts["dropped"]),
        }
        for name, counts in read_stats(collected)["sources"].items()
    ]
    create_table_artifact(rows, key="sources", description="Records, documents and drop reasons per source")
    return collected


@task(name=CLEAN.name, cache_policy=NO_CACHE)
def clean(
    artifacts_dir: Path, collected: StageRef, spec: CleanSpec, model: ModelSpec | None = None
) -> StageRef:
    """Repair, filter, redact and dedup (the model's tokenizer only when token bounds are set)."""
    return run_clean(artifacts_dir, collected, spec, model)


@task(name=GATE.name, cache_policy=NO_CACHE)
def gate(artifacts_dir: Path, cleaned: StageRef, spec: GateSpec) -> StageRef:
    """Stop bad data before any training time is spent; link the Data Docs from the UI."""
    gated = run_gate(artifacts_dir, cleaned, spec)
    docs = gated.file("data_docs/index.html")
    if docs.is_file():
        create_link_artifact(**data_docs_link(artifacts_dir, gated, docs))
    return gated


def data_docs_link(artifacts_dir: Path, gated: StageRef, docs: Path) -> dict[str, str]:
    """The Data Docs as the project's server serves them; on another server, where the file lies."""
    api_url = PREFECT_API_URL.value() or ""
    server = recorded_server(Path(artifacts_dir).resolve() / "prefect")
    if server and server["url"] == api_url:
        return {"link": data_docs_url(api_url, gated.digest), "link_text": "Data Docs", "key": "data-docs"}
    return {
        "link": docs.resolve().as_uri(),
        "link_text": f"Data Docs (on the machine that ran the flow: {docs.resolve()})",
        "key": "data-docs",
        "description": "Open the file on the machine that ran the flow, or run `tuneline ui` there.",
    }


@task(name=SPLIT.name, cache_policy=NO_CACHE)
def split(artifacts_dir: Path, gated: StageRef, spec: SplitSpec) -> StageRef:
    """Deal records into train, validation and test."""
    return run_split(artifacts_dir, gated, spec)


@task(name=BASE_MODEL.name, cache_policy=NO_CACHE)
def base_model(artifacts_dir: Path, model: ModelSpec) -> ModelSpec:
    """The recipe's model as a loadable folder: a GGUF file is dequantized once into its own stage
    (about a minute for 135M parameters on a CPU); any other model passes through."""
    if not model.name.lower().endswith(".gguf"):
        return model  # no torch or transformers import for a folder or hub model
    from tuneline.train.base_model import resolve_base_model

    return resolve_base_model(artifacts_dir, model)


@task(name=SELECT.name, cache_policy=NO_CACHE)
def select(
    artifacts_dir: Path,
    splits: StageRef,
    model: ModelSpec,
    spec: SelectSpec,
    evaluate_spec: EvaluateSpec,
    train_spec: TrainSpec,
    register: RegisterSpec | None = None,
    run_name: str = "tuneline",
) -> tuple[StageRef, ModelSpec]:
    """Score the model's candidates on the validation split (GGUF files dequantized once, memory as
    `tuneline train plan` estimates it for `train_spec`) and pick the base model by the recipe's
    rule; show the candidates' table in the UI. Returns the stage and the chosen model."""
    from tuneline.evaluate.select import run_select, selection_table  # torch, transformers
    from tuneline.train.base_model import resolve_base_model
    from tuneline.train.plan import plan_training

    tracking = TrackingTarget(register.tracking_uri, register.experiment, run_name) if register else None
    selected, chosen = run_select(
        artifacts_dir,
        splits,
        model,
        spec,
        evaluate_spec,
        resolve=lambda candidate: resolve_base_model(artifacts_dir, candidate),
        train_memory=lambda candidate: plan_training(candidate, train_spec).peak_bytes,
        tracking=tracking,
        echo=get_run_logger().info,
    )
    create_table_artifact(
        selection_table(read_stats(selected)),
        key="select",
        description="Base-model candidates on the validation split; the chosen one trains",
    )
    return selected, chosen


@task(name=PRETRAIN.name, cache_policy=NO_CACHE)
def pretrain(
    artifacts_dir: Path,
    collected: StageRef,
    splits: StageRef,
    model: ModelSpec,
    spec: PretrainSpec,
    register: RegisterSpec | None = None,
    run_name: str = "tuneline",
) -> StageRef:
    """Continue pre-training the base on the collected documents (and the train split's records if
    asked), tracked in its own MLflow run; show its loss curve and log in the UI."""
    pretrained = find_stage(artifacts_dir, PRETRAIN.name, pretrain_key(model, spec, collected, splits))
    if pretrained is None:
        from tuneline.train.pretrain import run_pretrain  # torch, transformers: only to train

        tracking = TrackingTarget(register.tracking_uri, register.experiment, run_name) if register else None
        pretrained = run_pretrain(
            artifacts_dir, collected, splits, model, spec, tracking=tracking, echo=get_run_logger().info
        )
    show_training(pretrained, "pretraining", "pretraining-loss-curve")
    return pretrained


@task(name=TRAIN.name, cache_policy=NO_CACHE)
def train(
    artifacts_dir: Path,
    splits: StageRef,
    model: ModelSpec,
    spec: TrainSpec,
    register: RegisterSpec | None = None,
    run_name: str = "tuneline",
    pretrained: StageRef | None = None,
) -> StageRef:
    """Fine-tune the base model (or the `pretrained` stage's model) on the train split, tracked in
    the `register` section's MLflow experiment; show the loss curve and the end of the training log
    in the UI."""
    trained = find_stage(artifacts_dir, TRAIN.name, train_key(model, spec, splits, pretrained))
    if trained is None:
        from tuneline.train.stage import run_train  # torch, transformers, TRL: only to train

        tracking = TrackingTarget(register.tracking_uri, register.experiment, run_name) if register else None
        trained = run_train(
            artifacts_dir,
            splits,
            model,
            spec,
            tracking=tracking,
            echo=get_run_logger().info,
            pretrained=pretrained,
        )
    show_training(trained, "training", "loss-curve")
    return trained


def show_training(trained: StageRef, key: str, curve_key: str) -> None:
    """A training stage's summary and the end of its log (`key`) and loss curve (`curve_key`) as
    Prefect artifacts."""
    if trained.file(CURVE_FILE).is_file():
        create_image_artifact(
            image_data_url(trained.file(CURVE_FILE)), key=curve_key, description="Loss by step"
        )
    log_text = trained.file(LOG_FILE).read_text(encoding="utf-8") if trained.file(LOG_FILE).is_file() else ""
    create_markdown_artifact(
        training_markdown(read_stats(trained), log_text), key=key, description=key.capitalize()
    )


@task(name=EVALUATE.name, cache_policy=NO_CACHE)
def evaluate(
    artifacts_dir: Path,
    splits: StageRef,
    trained: StageRef,
    model: ModelSpec,
    spec: EvaluateSpec,
    register: RegisterSpec | None = None,
) -> StageRef:
    """Compare base, tuned and (when `register`'s model has one) champion on the test split; show
    examples side by side in the UI."""
    evaluated = find_stage(artifacts_dir, EVALUATE.name, evaluate_key(model, spec, splits, trained))
    if evaluated is None:
        from tuneline.evaluate.stage import run_evaluate  # torch, transformers: only to evaluate
        from tuneline.register.champion import champion_model  # MLflow: only to evaluate

        champion = champion_model(artifacts_dir, register, trained) if register else None
        evaluated = run_evaluate(artifacts_dir, splits, trained, model, spec, champion)
    show_examples(evaluated)
    return evaluated


def show_examples(evaluated: StageRef, shown: int = EXAMPLES_SHOWN) -> None:
    """The first test examples side by side (prompt, reference, base, tuned, champion) as a table."""
    rows = []
    for row in iter_records(evaluated, "predictions.jsonl"):
        if len(rows) == shown:
            break
        rows.append(side_by_side_row(row))
    if rows:
        create_table_artifact(
            rows, key="examples", description=f"The first {len(rows)} test examples, replies side by side"
        )


@task(name=JUDGE.name, **network_retries(backoff_factor=5), cache_policy=NO_CACHE)
def judge(artifacts_dir: Path, evaluated: StageRef, spec: JudgeSpec) -> StageRef:
    """Ask the recipe's LLM judge which reply is better, tuned vs base and champion, in both orders;
    show the win rates in the UI."""
    judged = run_judge(artifacts_dir, evaluated, spec, api_key=teacher_api_key(spec.endpoint))
    rows, description = judge_table(read_stats(judged))
    create_table_artifact(rows, key="judge", description=description)
    return judged


@task(name=BENCHMARKS.name, cache_policy=NO_CACHE)
def benchmarks(artifacts_dir: Path, trained: StageRef, model: ModelSpec, spec: EvaluateSpec) -> StageRef:
    """Score base and tuned model on the recipe's lm-eval tasks (each model and task cached: the
    base model's once for every run); show them side by side with the change in the UI."""
    benchmarked = run_benchmarks(artifacts_dir, trained, model, spec)
    create_table_artifact(
        table_rows(read_stats(benchmarked)),
        key="benchmarks",
        description="lm-eval benchmarks, base vs tuned, in points (± stderr); change = tuned - base",
    )
    return benchmarked


@task(name=REGISTER.name, cache_policy=NO_CACHE)
def register(
    artifacts_dir: Path,
    recipe: Recipe,
    splits: StageRef,
    trained: StageRef,
    evaluated: StageRef,
    evidence: list[StageRef] | None = None,
) -> StageRef:
    """Register the tuned model in MLflow and promote it if it beats the champion and passes the
    guardrails, which read `evidence` (the benchmarks, judge and comparison stages that ran)."""
    evidence = evidence or []
    key = register_key(recipe, splits, trained, evaluated, evidence)
    if registered := find_stage(artifacts_dir, REGISTER.name, key):
        return registered
    from tuneline.register.stage import run_register  # MLflow: only to register

    return run_register(artifacts_dir, recipe, splits, trained, evaluated, evidence)


@task(name="tidy_store", cache_policy=NO_CACHE)
def tidy_store(artifacts_dir: Path) -> list[str]:
    """Remove the temporary stage folders of killed runs (never one a live run is writing)."""
    removed = [str(path) for path in remove_stale_temporaries(artifacts_dir)]
    if removed:
        get_run_logger().info("removed %d temporary folder(s) left by killed runs: %s", len(removed), removed)
    return removed


@task(name="save_recipe", cache_policy=NO_CACHE)
def save_recipe(run_dir: Path, recipe: Recipe) -> Path:
    """Keep the resolved recipe beside the run's report."""
    return save_run_recipe(run_dir, recipe)


@task(name="check_evaluate", cache_policy=NO_CACHE)
def check_evaluate(evaluate: EvaluateSpec) -> None:
    """Read the recipe's test suites and the judge's rubric and check the benchmarks' task names
    first, so a mistake there stops the run now, not after training."""
    check_benchmarks(evaluate.benchmarks)  # imports lm-eval only when there are benchmarks
    if evaluate.suites:
        from tuneline.evaluate.suites import load_suite

        for path in evaluate.suites:
            load_suite(path)
    if evaluate.judge is not None:  # and the judge's rubric file
        load_rubric(evaluate.judge)


@task(name="report", cache_policy=NO_CACHE)
def report(run_dir: Path, stages: dict[str, StageRef], started_at: str | None = None) -> dict:
    """Check the ledger across stages, write the run report and show the funnel in the UI."""
    summary = build_report(stages, started_at)
    write_report(run_dir, summary)
    rows = [
        {
            "stage": row["stage"],
            "in": row["in"],
            "out": row["out"],
            "dropped": format_dropped(row["dropped"]),
        }
        for row in summary["funnel"]
    ]
    create_table_artifact(rows, key="funnel", description="Records per stage and drop reasons")
    create_markdown_artifact(render_markdown(summary), key="run-report", description="Tuneline run report")
    return summary
