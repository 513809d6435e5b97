"""The `finetune` flow: the whole pipeline, read top to bottom like the diagram in the README.

    fetch (each source) -> collect -> [augment <-> review] -> clean -> gate -> split
    -> [base_model] -> [select] -> [pretrain] -> train -> evaluate -> [benchmarks] -> [judge]
    -> [compare: people, blind pairs] -> register -> report

Its one parameter is the recipe, so the Prefect UI renders it as a form and a deployment is
triggered with it. Tasks get the recipe section they need plus references to earlier stages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, unmapped
from prefect.runtime import flow_run
from tuneline.flows.augment import augment_rounds
from tuneline.flows.compare import compare_replies
from tuneline.tasks.stages import (
    base_model,
    benchmarks,
    check_evaluate,
    clean,
    collect,
    evaluate,
    fetch,
    gate,
    judge,
    pretrain,
    register,
    report,
    save_recipe,
    select,
    split,
    tidy_store,
    train,
)

from tuneline.errors import quiet_user_errors
from tuneline.experiment import check_tracking_store
from tuneline.objectstore import open_artifacts
from tuneline.recipe import Recipe
from tuneline.store import StageRef


@flow(name="finetune")
def finetune(recipe: Recipe) -> dict:
    """Fine-tune a base model on the recipe's sources and register it; returns the run report."""
    quiet_user_errors()  # a worker's log shows a user's mistake without a traceback
    artifacts_dir = open_artifacts(recipe.artifacts_dir, recipe.work_dir)
    started = datetime.now(UTC)
    run_dir = artifacts_dir / "runs" / f"{started:%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"
    save_recipe(run_dir, recipe)
    check_evaluate(recipe.evaluate)  # a bad suite, rubric or benchmark name fails before any work
    check_tracking_store(recipe.register.tracking_uri)  # so does a database store that is down
    tidy_store(artifacts_dir)  # a killed run's temporary stage folders

    fetched = fetch.map(unmapped(artifacts_dir), recipe.sources).result()  # raises if a source fails
    collected = collect(artifacts_dir, recipe.sources, fetched)
    return run_from_collected(artifacts_dir, recipe, collected, run_dir, started)


def run_from_collected(
    artifacts_dir: Path, recipe: Recipe, collected: StageRef, run_dir: Path, started: datetime
) -> dict:
    """Everything after collect, up to the run report: the finetune flow's and the refresh flow's
    shared body (called inline, so a review pause or suspension holds the calling run)."""
    if recipe.augment is not None:  # teacher rounds, each reviewed; clean reads collected + accepted
        data, _ = augment_rounds(artifacts_dir, recipe.augment, collected, recipe.register)
    else:
        data = collected
    written_model = recipe.model  # select compares the candidates as the recipe names them
    recipe = recipe.model_copy(update={"model": base_model(artifacts_dir, recipe.model)})  # GGUF: a folder
    cleaned = clean(artifacts_dir, data, recipe.clean, recipe.model)
    gated = gate(artifacts_dir, cleaned, recipe.gate)
    splits = split(artifacts_dir, gated, recipe.split)
    selection = []  # the candidates scored on the validation split; the rule's choice trains
    if written_model.candidates:
        selected, chosen = select(
            artifacts_dir, splits, written_model, recipe.select, recipe.evaluate, recipe.train,
            recipe.register, recipe.name,
        )  # fmt: skip
        recipe, selection = recipe.model_copy(update={"model": chosen}), [selected]
    pretrained = None
    if recipe.pretrain is not None:  # causal LM on the documents; train starts from its model
        pretrained = pretrain(
            artifacts_dir, collected, splits, recipe.model, recipe.pretrain, recipe.register, recipe.name
        )
    trained = train(
        artifacts_dir, splits, recipe.model, recipe.train, recipe.register, recipe.name, pretrained
    )
    if recipe.train.distributed.node_rank > 0:  # this machine lent its workers; node 0 evaluates, registers
        augmented, pretraining = [data] if recipe.augment else [], [pretrained] if pretrained else []
        produced = [collected, *augmented, cleaned, gated, splits, *selection, *pretraining, trained]
        summary = report(run_dir, {ref.stage: ref for ref in produced}, started.isoformat(timespec="seconds"))
        return {**summary, "run_dir": str(run_dir)}
    evaluated = evaluate(artifacts_dir, splits, trained, recipe.model, recipe.evaluate, recipe.register)
    # lm-eval benchmarks, base vs tuned: the "did fine-tuning make it forget" check.
    benchmarked = []
    if recipe.evaluate.benchmarks:
        benchmarked = [benchmarks(artifacts_dir, trained, recipe.model, recipe.evaluate)]
    # An LLM judge: tuned vs base and champion, each pair in both orders.
    judged = [judge(artifacts_dir, evaluated, recipe.evaluate.judge)] if recipe.evaluate.judge else []
    compared = []  # people compare replies blind (the run waits unless wait: later); Elo, Bradley-Terry
    if recipe.evaluate.human is not None:
        model_name, base_name = recipe.register.model_name, recipe.model.name  # the ledger's names
        found = compare_replies(
            artifacts_dir, recipe.evaluate.human, evaluated, model_name, base_name, next(iter(judged), None)
        )
        compared = [found] if found is not None else []
    # Promotion reads the champion's scores on this test split and the guardrails' evidence.
    evidence = [*benchmarked, *judged, *compared]
    registered = register(artifacts_dir, recipe, splits, trained, evaluated, evidence)

    augmented = [data] if recipe.augment is not None else []  # collected + teacher's records
    pretraining = [pretrained] if pretrained is not None else []
    modelled = [*pretraining, trained, evaluated, *evidence, registered]
    produced = [collected, *augmented, cleaned, gated, splits, *selection, *modelled]
    summary = report(run_dir, {ref.stage: ref for ref in produced}, started.isoformat(timespec="seconds"))
    return {**summary, "run_dir": str(run_dir)}
