"""The pipeline's stages, in the order records flow through them: one name per stage.

Each name is the stage's folder under `stages/`, its Prefect task, `manifest.stage`, its MLflow
keys, its row in the run report and its word in the CLI. `code` lists what a stage runs, so a
change there re-runs the stage and everything after it (their inputs' digests change), and a
change elsewhere does not: a fix in the training code never re-runs collect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.errors import UserError
from tuneline.store import DOCUMENTS, Stage, StageRef, files_digest, stage_key

if TYPE_CHECKING:
    from tuneline.recipe import (
        BenchmarkSpec,
        EvaluateSpec,
        HumanSpec,
        JudgeSpec,
        ModelSpec,
        PretrainSpec,
        Recipe,
        SelectSpec,
        TrainSpec,
    )

FETCH = Stage(
    "fetch",
    entry="tuneline.sources.fetch",
    code=(
        "tuneline.sources.fetch",
        "tuneline.sources.download",
        "tuneline.sources.unpack",
        "tuneline.sources.crawl",
        "tuneline.sources.shared_crawl",  # a crawl shared through Redis (redis_url)
        "tuneline.sources.errors",
        "tuneline.crawlers",  # the Scrapy project the crawl runs in a subprocess
        "tuneline.formats",  # what a download really is and how it unpacks (formats.containers)
        "tuneline.records",
    ),
)
COLLECT = Stage(
    "collect",
    entry="tuneline.sources.collect",
    code=("tuneline.sources", "tuneline.formats", "tuneline.records"),
)
AUGMENT_ROUND = Stage(
    "augment_round",
    entry="tuneline.augment.rounds",
    code=(
        "tuneline.augment.rounds",
        "tuneline.augment.checks",
        "tuneline.augment.teacher",
        "tuneline.augment.cot",
        "tuneline.formats",
        "tuneline.records",
    ),
)
AUGMENT = Stage("augment", entry=AUGMENT_ROUND.entry, code=AUGMENT_ROUND.code)
CLEAN = Stage(
    "clean",
    entry="tuneline.curate.clean",
    code=(
        "tuneline.curate.clean",
        "tuneline.curate.shards",  # clean.executor dask, and the shard ledgers of either executor
        "tuneline.curate.pii",
        "tuneline.curate.secrets",
        "tuneline.curate.dedup",
        "tuneline.curate.shingles",
        "tuneline.models",  # the tokenizer of token-length bounds
        "tuneline.records",
    ),
)
GATE = Stage(
    "gate",
    entry="tuneline.curate.gate",
    code=("tuneline.curate.gate", "tuneline.curate.docs", "tuneline.records"),
)
SPLIT = Stage(
    "split",
    entry="tuneline.curate.split",
    code=(
        "tuneline.curate.split",
        "tuneline.curate.dedup",
        "tuneline.curate.shingles",
        "tuneline.formats",  # benchmark files are read as records
        "tuneline.records",
    ),
)
# Loading a model, generating with it and scoring it: what train (its validation metric picks the
# best checkpoint), evaluate and register all run.
# The suites' rubric assertions ask the judge (tuneline.evaluate.judge) through the teacher client.
# Named module by module: an edit to selection, benchmarks or people's comparisons re-runs only them.
MODEL_CODE = (
    *("tuneline.evaluate.stage", "tuneline.evaluate.metrics", "tuneline.evaluate.suites"),
    *("tuneline.evaluate.judge", "tuneline.augment.teacher", "tuneline.models", "tuneline.records"),
)
# A GGUF base model dequantized once into a model folder (train, evaluate and register load it).
BASE_MODEL = Stage(
    "base_model", entry="tuneline.train.base_model", code=("tuneline.train.base_model", "tuneline.models")
)
# Base-model selection (before training): each of `model.candidates` scored on the validation
# split in a stage of its own, keyed by the candidate's content (adding one scores only it); then
# `select` applies the recipe's rule to the scores and logs the table.
SELECT_CANDIDATE = Stage(
    "select_candidate",
    entry="tuneline.evaluate.select",
    code=("tuneline.evaluate.select", "tuneline.experiment", *MODEL_CODE),
)
SELECT = Stage("select", entry=SELECT_CANDIDATE.entry, code=SELECT_CANDIDATE.code)
# Continued pre-training on documents; the train stage then starts from its model.
PRETRAIN = Stage(
    "pretrain", entry="tuneline.train.pretrain", code=("tuneline.train", "tuneline.experiment", *MODEL_CODE)
)
TRAIN = Stage(
    "train", entry="tuneline.train.stage", code=("tuneline.train", "tuneline.experiment", *MODEL_CODE)
)
EVALUATE = Stage("evaluate", entry="tuneline.evaluate.stage", code=MODEL_CODE)
# An LLM judge on the evaluate stage's predictions: tuned vs base and champion, both orders.
JUDGE = Stage(
    "judge", entry="tuneline.evaluate.judge", code=("tuneline.evaluate.judge", "tuneline.augment.teacher")
)
# People compare the evaluate stage's replies blind; Elo and Bradley-Terry over the model's ledger.
COMPARE = Stage(
    "compare",
    entry="tuneline.evaluate.compare_stage",
    code=(
        "tuneline.evaluate.compare_stage",
        "tuneline.evaluate.compare",
        "tuneline.evaluate.ratings",
        "tuneline.augment.review",  # the journal and atomic writes of data review
    ),
)
# lm-evaluation-harness tasks: one model on one task per `benchmark` stage (the base model's scores
# are computed once and reused by every later run, the tuned model's per train stage); `benchmarks`
# sets base and tuned side by side for the report and the register stage's guardrail.
BENCHMARK = Stage(
    "benchmark",
    entry="tuneline.evaluate.benchmarks",
    code=("tuneline.evaluate.benchmarks", "tuneline.models"),
)
BENCHMARKS = Stage("benchmarks", entry=BENCHMARK.entry, code=BENCHMARK.code)
# The modules the register stage runs, and chat_model.py, the MLflow model's code it logs; not the
# whole package (serve, export, retention and runs do not change what a registration writes).
REGISTER = Stage(
    "register",
    entry="tuneline.register.stage",
    code=(
        *("tuneline.register.stage", "tuneline.register.registry", "tuneline.register.guardrails"),
        *("tuneline.register.chat_model", "tuneline.experiment", "tuneline.report", *MODEL_CODE),
    ),
)

# Every stage, in pipeline order; the run report's funnel follows it.
STAGES = (
    *(FETCH, COLLECT, AUGMENT_ROUND, AUGMENT, CLEAN, GATE, SPLIT),
    *(BASE_MODEL, SELECT_CANDIDATE, SELECT, PRETRAIN, TRAIN, EVALUATE),
    *(BENCHMARK, BENCHMARKS, JUDGE, COMPARE, REGISTER),
)
# The stages that take in every record the one before put out: the funnel of the run report.
FUNNEL = tuple(stage.name for stage in (COLLECT, AUGMENT, CLEAN, GATE, SPLIT, TRAIN, EVALUATE, REGISTER))


# The digests of the stages whose code imports torch, transformers or MLflow (seconds): the tasks
# look a finished stage up with them before importing any of that.


def select_candidate_key(candidate: str, settings: dict[str, Any], validation: str, shots: list[str]) -> str:
    """A candidate's score stage digest: its content (`candidate`: name and revision, or a folder's
    content digest), the scoring `settings` (metrics, few-shot, generation, device), the validation
    split's content and the few-shot examples' ids."""
    return stage_key(SELECT_CANDIDATE, candidate, settings, validation, shots)


def select_key(scored: list[StageRef], select: SelectSpec, metric: str, train_memory: list[int]) -> str:
    """The select stage's digest: the candidates' score stages in order, the rule (the `select`
    section, the ranking metric) and each candidate's training-memory estimate in bytes."""
    return stage_key(SELECT, [ref.digest for ref in scored], select, metric, train_memory)


def pretrain_key(model: ModelSpec, pretrain: PretrainSpec, collected: StageRef, splits: StageRef) -> str:
    """The pretrain stage's digest: the base, the section, the content of the collect stage's
    documents (not its records) and, only when the section takes in the train split's records
    (`include_records`), the split."""
    documents = collected.file(DOCUMENTS)
    documents_digest = files_digest(documents) if documents.is_file() else None
    records = splits.digest if pretrain.include_records else None
    return stage_key(PRETRAIN, model, pretrain, documents_digest, records)


def train_key(
    model: ModelSpec, train: TrainSpec, splits: StageRef, pretrained: StageRef | None = None
) -> str:
    """The train stage's digest. `resume` and where a distributed run meets (node rank, address,
    port) do not change the result, so they stay out: every node and a resumed run agree on it.
    A training that starts from a pretrain stage's model (`pretrained`) keys on that stage too."""
    section = train.model_dump(
        mode="json",
        exclude={"resume": True, "distributed": {"node_rank", "main_address", "main_port", "wait_s"}},
    )
    if pretrained is None:  # the key of a recipe without pretraining stays what it was
        return stage_key(TRAIN, model, section, splits.digest)
    return stage_key(TRAIN, model, section, splits.digest, pretrained.digest)


def evaluate_key(model: ModelSpec, evaluate: EvaluateSpec, splits: StageRef, trained: StageRef) -> str:
    """The evaluate stage's digest: both models, the settings, the test split and the content of
    the suite and JSON Schema files the section names (editing a suite re-runs the stage)."""
    paths = [*evaluate.suites, *([evaluate.json_schema] if evaluate.json_schema else [])]
    if not paths:  # the key of a recipe without such files stays what it was
        return stage_key(EVALUATE, model, evaluate_section(evaluate), splits.digest, trained.digest)
    for path in paths:
        if not Path(path).is_file():
            raise UserError(
                f"evaluate: file {path} not found (paths are relative to the project folder, {Path.cwd()}); "
                "fix evaluate.suites or evaluate.json_schema"
            )
    section = evaluate_section(evaluate)
    return stage_key(EVALUATE, model, section, splits.digest, trained.digest, files_digest(*paths))


def evaluate_section(evaluate: EvaluateSpec) -> dict[str, Any]:
    """The evaluate section as its stage's key sees it: of the judge (which has a stage of its own)
    only what decides a rubric assertion's verdict, the model and its sampling, and only when there
    are suites; without a judge the key stays what it was before the judge existed."""
    # human: the compare stage; benchmarks: stages of their own
    section = evaluate.model_dump(mode="json", exclude={"judge", "human", "benchmarks"})
    if evaluate.judge is not None and evaluate.suites:
        section["judge"] = evaluate.judge.verdict_settings()["endpoint"]
    return section


def benchmark_key(model_id: str, benchmark: BenchmarkSpec, data_digest: str | None, lm_eval: str) -> str:
    """One model's scores on one lm-eval task: the model by content (`model_id`), what runs (task,
    limit, few-shot), the content of its data files and task YAMLs (not their paths) and the lm-eval
    version (`lm_eval`), whose task definitions and metrics decide the scores."""
    section = benchmark.model_dump(mode="json", include={"task", "limit", "num_fewshot"})
    return stage_key(BENCHMARK, model_id, section, data_digest, lm_eval)


def benchmarks_key(scored: list[str], benchmarks: list[BenchmarkSpec]) -> str:
    """The base-vs-tuned table's digest: the `benchmark` stages it reads (`scored`, their digests)
    and the metric compared per task."""
    return stage_key(BENCHMARKS, scored, [(benchmark.task, benchmark.metric) for benchmark in benchmarks])


def judge_key(judge: JudgeSpec, evaluated: StageRef) -> str:
    """The judge stage's digest: the evaluate stage (its predictions), what decides a verdict (the
    judge's model and sampling, rubric, pairs, limits; not its URL, key, mode or concurrency, so a
    stage judged live is reused in replay) and the rubric file's content."""
    rubric_digest = None
    if judge.rubric_file is not None:
        if not Path(judge.rubric_file).is_file():
            raise UserError(
                f"evaluate.judge.rubric_file: file {judge.rubric_file} not found (paths are relative to "
                f"the project folder, {Path.cwd()}); fix it or write the rubric in evaluate.judge.rubric"
            )
        rubric_digest = files_digest(judge.rubric_file)
    return stage_key(JUDGE, judge.verdict_settings(), rubric_digest, evaluated.digest)


def compare_key(
    human: HumanSpec, evaluated: StageRef, judged: StageRef | None, model_name: str, base_name: str
) -> str:
    """The compare stage's digest: what decides the batch (samples, seed, opponents, ratings
    settings; not how the run waits or who answers in the UI), the evaluate stage, the judge stage
    whose verdicts it adds, and the registered model whose ledger it reads."""
    section = human.model_dump(mode="json", exclude={"wait", "timeout_s", "rater"})
    judge = judged.digest if judged is not None else None
    return stage_key(COMPARE, section, evaluated.digest, judge, model_name, base_name)


def register_key(
    recipe: Recipe,
    splits: StageRef,
    trained: StageRef,
    evaluated: StageRef,
    evidence: Sequence[StageRef] = (),
) -> str:
    """The register stage's digest: the whole recipe (logged as the run's params), its inputs and
    the stages whose figures it logs and its guardrails read (`evidence`: benchmarks, judge, ...)."""
    inputs = [splits.digest, trained.digest, evaluated.digest, *(f"{r.stage}:{r.digest}" for r in evidence)]
    return stage_key(REGISTER, recipe.register, recipe.digest(), *inputs)
