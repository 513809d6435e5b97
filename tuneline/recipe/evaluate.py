"""The recipe's `evaluate` section: which metrics and test suites score base vs tuned on the
test split. Re-exported by tuneline.recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneline.recipe.augment import TeacherSpec
from tuneline.recipe.section import Section

# Task metrics the evaluate stage can compute; every one is a share, higher is better.
EvalMetric = Literal["exact_match", "label_accuracy", "rouge_l", "token_f1", "json_valid", "schema_match"]
# What `register.promote_metric` may name: a task metric, the loss, or the test suites' pass rate.
PromoteMetric = Literal[
    "exact_match",
    "loss",
    "label_accuracy",
    "rouge_l",
    "token_f1",
    "json_valid",
    "schema_match",
    "suite_pass_rate",
]


class HumanSpec(Section):
    """People compare replies blind, in pairs: for `samples` test prompts, the tuned model's reply
    against each opponent's in random order, shown as A and B; a person picks A, B or tie. The
    outcomes join a ledger per registered model that Elo and Bradley-Terry ratings are fitted on."""

    samples: int = Field(20, ge=1, description="How many test prompts are sampled (seeded) for comparison.")
    against: list[Literal["base", "champion"]] = Field(
        ["base", "champion"],
        min_length=1,
        description="Opponents of the tuned model; champion only when the registry has one.",
    )
    wait: Literal["pause", "suspend", "later"] = Field(
        "pause",
        description="pause: the run waits for the answers (up to timeout_s); suspend: in a deployment the "
        "run is suspended and its worker freed until then (elsewhere it pauses); later: the run goes on "
        "without waiting, the batch is decided later (`tuneline compare`) and a re-run uses it.",
    )
    timeout_s: int = Field(
        24 * 3600, ge=1, description="Seconds a run waits for the answers before it fails (answers are kept)."
    )
    rater: str = Field("rater", min_length=1, description="Name recorded for answers from the Prefect UI.")
    seed: int = Field(0, description="Seeds which prompts are sampled.")
    judge: bool = Field(
        True, description="Add the judge's verdicts (evaluate.judge) to the ratings as a second rater."
    )
    k_factor: float = Field(
        32.0,
        gt=0,
        description="Elo's K: rating points an upset moves (Chatbot Arena uses 4 over millions of games; "
        "32 suits tens).",
    )
    bootstrap: int = Field(
        200, ge=10, description="Bootstrap rounds (battles resampled) for Bradley-Terry's 95% intervals."
    )


# The judge's rubric when the recipe gives none: what "better" means for most assistants.
DEFAULT_RUBRIC = (
    "The better reply answers the user's last message correctly and completely, follows the "
    "instructions in the conversation (the system prompt's format included), and is no longer than "
    "it needs to be. A reply that matches the reference answer's meaning is correct."
)
# Where the judge's endpoint is and how it is reached: left out of the stages' keys, since they do
# not change a verdict (a stage judged live is reused when replayed from the recordings).
JUDGE_TRANSPORT = frozenset(
    {
        "base_url",
        "api_key_env",
        "api_key_secret",
        "mode",
        "recordings",
        "concurrency",
        "max_retries",
        "timeout_s",
    }
)


class JudgeEndpoint(TeacherSpec):
    """The judge's OpenAI-compatible endpoint: the teacher client's settings, with defaults for
    verdicts (temperature 0: a verdict is not sampled; short replies; its own recordings)."""

    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature; 0 for repeatable verdicts."
    )
    max_tokens: int = Field(
        512, ge=1, description="Longest verdict, in tokens (a JSON object with a reason)."
    )
    recordings: str = Field(".tuneline/judge", description="Folder of recorded exchanges (one JSON each).")


class JudgeSpec(Section):
    """An LLM judge: tuned vs base (and vs the champion, when the registry had one at evaluation)
    on the evaluate stage's test examples, each pair asked twice with the replies swapped to cancel
    position bias; it also checks the test suites' `rubric` assertions."""

    endpoint: JudgeEndpoint = Field(
        description="The judge model's endpoint (the teacher client: record/replay, concurrency, retries)."
    )
    rubric: str | None = Field(
        None, min_length=1, description="What makes a reply better, in words; empty: a general default."
    )
    rubric_file: str | None = Field(
        None, description="A text file (relative to the project) holding the rubric, instead of `rubric`."
    )
    pairs: list[Literal["base", "champion"]] = Field(
        ["base", "champion"],
        min_length=1,
        description="Opponents of the tuned model; champion only where the evaluate stage scored one.",
    )
    max_examples: int | None = Field(
        100, ge=1, description="Judge at most this many test examples (each costs 2 requests per pair)."
    )
    show_reference: bool = Field(True, description="Show the judge the test example's reference answer.")

    @model_validator(mode="after")
    def _one_rubric(self) -> JudgeSpec:
        if self.rubric is not None and self.rubric_file is not None:
            raise ValueError("give the rubric as text (rubric) or as a file (rubric_file), not both")
        if len(set(self.pairs)) != len(self.pairs):
            raise ValueError(f"pairs: {self.pairs} names an opponent twice; list base and champion once each")
        return self

    def verdict_settings(self) -> dict:
        """What decides the verdicts (the stages' keys): all but where and how the endpoint is reached."""
        return self.model_dump(mode="json", exclude={"endpoint": set(JUDGE_TRANSPORT)})


class BenchmarkSpec(Section):
    """One lm-evaluation-harness task run on the base and the tuned model (the benchmarks stage)."""

    task: str = Field(
        min_length=1,
        description="An lm-eval task name (arc_easy, arc_challenge, hellaswag, truthfulqa_mc2, "
        "mmlu_computer_security, ... as `lm-eval ls tasks` lists them; a group with an aggregate such "
        "as mmlu), or a task defined in a YAML file under `include_path`.",
    )
    limit: int | None = Field(
        None, ge=1, description="Score at most this many documents of the task (each subtask of a group)."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt; empty: the task's own setting (mostly 0)."
    )
    metric: str | None = Field(
        None,
        description="The metric compared base vs tuned (acc, acc_norm, ...); empty: acc_norm where the task "
        "reports it, else acc, else its first metric.",
    )
    data_files: dict[str, str] = Field(
        {},
        description="Local data files by split name (e.g. {validation: data/arc_easy.jsonl}, relative to "
        "the project) in the hub dataset's column layout: the task reads them with the json loader "
        "instead of downloading its dataset, so it runs offline.",
    )
    include_path: str | None = Field(
        None,
        description="A folder (relative to the project) of your own lm-eval task YAML files; `task` may "
        "name one of them. Its files key the stage: editing one re-runs the task.",
    )

    @model_validator(mode="after")
    def _split_names(self) -> BenchmarkSpec:
        for split, path in self.data_files.items():
            if not split.strip() or not path.strip():
                raise ValueError(
                    f"data_files: {split!r}: {path!r} needs a split name and a file path, "
                    "e.g. {validation: data/arc_easy.jsonl}"
                )
        return self


class EvaluateSpec(Section):
    """Base vs tuned model on the test split: loss, exact match and the chosen task metrics on
    greedy generations, and test suites of prompts with assertions."""

    metric: EvalMetric = Field(
        "exact_match", description="The headline metric of the report (computed even if not in `metrics`)."
    )
    metrics: list[EvalMetric] = Field(
        [],
        description="Metrics computed beside loss and exact match: label_accuracy (with a confusion "
        "table) for classification, rouge_l and token_f1 for free text, json_valid and schema_match "
        "(needs `json_schema`) for structured answers.",
    )
    json_schema: str | None = Field(
        None,
        description="JSON Schema file (relative to the project) that schema_match validates replies against.",
    )
    suites: list[str] = Field(
        [],
        description="Test-suite YAML files (relative to the project): cases of a prompt and assertions "
        "(equals, contains, regex, json_schema, numeric, rubric) run on base and tuned; docs/evaluate.md.",
    )
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test records.")
    human: HumanSpec | None = Field(
        None, description="Blind pairwise comparison by people, with Elo and Bradley-Terry ratings."
    )
    judge: JudgeSpec | None = Field(
        None,
        description="An LLM judge on an OpenAI-compatible endpoint: tuned vs base and champion, both "
        "orders, and the suites' rubric assertions; docs/evaluate.md#judge.",
    )
    benchmarks: list[BenchmarkSpec] = Field(
        [],
        description="lm-evaluation-harness tasks scored on base and tuned model, side by side with the "
        "change (the 'did it forget' check); each task and model is cached; docs/evaluate.md#benchmarks.",
    )

    def chosen_metrics(self) -> list[str]:
        """Every task metric the stage computes: exact match, the headline and `metrics`, once each."""
        return list(dict.fromkeys(["exact_match", self.metric, *self.metrics]))

    @model_validator(mode="after")
    def _schema_for_schema_match(self) -> EvaluateSpec:
        if "schema_match" in self.chosen_metrics() and not self.json_schema:
            raise ValueError(
                "schema_match needs a JSON Schema to check replies against: set evaluate.json_schema "
                "to a schema file, or drop schema_match"
            )
        return self

    @model_validator(mode="after")
    def _each_benchmark_once(self) -> EvaluateSpec:
        tasks = [benchmark.task for benchmark in self.benchmarks]
        twice = sorted({task for task in tasks if tasks.count(task) > 1})
        if twice:
            raise ValueError(
                f"benchmarks: {', '.join(twice)} listed more than once; each task's scores are keyed by "
                "its name, so list it once (with the limit and num_fewshot you want)"
            )
        return self


def promote_metric_problem(evaluate: EvaluateSpec, promote_metric: str) -> str | None:
    """Why `register.promote_metric` cannot be decided on with this evaluate section, or None."""
    if promote_metric == "suite_pass_rate":
        if not evaluate.suites:
            return "register.promote_metric is suite_pass_rate but evaluate.suites is empty: add a suite"
        return None
    if promote_metric != "loss" and promote_metric not in evaluate.chosen_metrics():
        return (
            f"register.promote_metric is {promote_metric} but the evaluate stage does not compute it: "
            f"add {promote_metric} to evaluate.metrics"
        )
    return None
