"""The recipe's `augment` section: the teacher endpoint, the rounds and their automatic checks, and
the human review checkpoint with its auto policy. Re-exported by tuneline.recipe."""

from __future__ import annotations

import re
import string
from typing import Literal

from pydantic import Field, model_validator

from tuneline.recipe.section import Format, Section


class TeacherSpec(Section):
    """The teacher: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, a Tuneline-served model).

    Every exchange can be recorded by request digest, so re-runs cost nothing (`record`) and a run
    can be repeated offline, exactly (`replay`).
    """

    base_url: str = Field(
        pattern=r"^https?://",
        description="Endpoint root, usually ending in /v1 (e.g. http://localhost:8000/v1).",
    )
    model: str = Field(min_length=1, description="Model name the endpoint serves.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the API key; wins over api_key_env."
    )
    mode: Literal["live", "record", "replay"] = Field(
        "record",
        description="live: always ask; record: serve recorded exchanges, ask and record the rest; "
        "replay: recorded exchanges only (offline), a missing one is an error.",
    )
    recordings: str = Field(".tuneline/teacher", description="Folder of recorded exchanges (one JSON each).")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once, at most.")
    max_retries: int = Field(5, ge=0, le=20, description="Retries of a request on 429, 5xx and timeouts.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one try may take.")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=1, description="Longest reply, in tokens.")
    seed: int | None = Field(None, description="Sampling seed sent to the endpoint (where it honours one).")
    json_mode: bool = Field(True, description="Ask for a JSON object reply (response_format json_object).")


class AutoRejectRule(Section):
    """Auto policy rule: reject a candidate whose text matches `pattern`, giving `reason`."""

    pattern: str = Field(description="Regular expression searched in the candidate's messages.")
    reason: str = Field(min_length=1, description="Reject reason recorded (and fed back to the teacher).")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> AutoRejectRule:
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {error}") from None
        return self


class AutoPolicy(Section):
    """Decisions for unattended runs, recorded with `reviewer: auto-policy`.

    Every candidate reaching review has passed the automatic checks; the first matching rule
    rejects it, the rest get `default`.
    """

    default: Literal["accept", "reject"] = Field(
        description="Decision for a candidate no rule rejects (accept: trust the automatic checks)."
    )
    reject_if: list[AutoRejectRule] = Field(default_factory=list, description="Rules tried in order.")


class ReviewSpec(Section):
    """The human review checkpoint after each augmentation round.

    `prefect`, `terminal` and `file` all pause the run until every candidate has a decision
    (accept, reject with a reason, or edit); they differ only in where the reviewer is told to
    look. `auto` decides with the explicit `auto` policy and never pauses.
    """

    how: Literal["prefect", "terminal", "file", "auto"] = Field(
        "prefect",
        description="prefect: form in the paused run; terminal: `tuneline review decide`; "
        "file: `tuneline review export/import`; auto: the `auto` policy, no person.",
    )
    timeout_s: int = Field(
        24 * 3600, ge=1, description="Seconds a round waits for decisions before the run fails (kept)."
    )
    reviewer: str = Field("reviewer", min_length=1, description="Name recorded for decisions from the UI.")
    auto: AutoPolicy | None = Field(None, description="The policy used when `how` is auto.")

    @model_validator(mode="after")
    def _auto_needs_policy(self) -> ReviewSpec:
        if self.how == "auto" and self.auto is None:
            raise ValueError(
                "how: auto needs an explicit policy: set auto.default (accept or reject) "
                "and optionally auto.reject_if rules"
            )
        return self


class SeedsSpec(Section):
    """Seed examples shown to the teacher: a file of any supported format."""

    path: str = Field(description="Local path (relative to the project) or fsspec URL of the seed file.")
    format: Format | None = Field(None, description="Record format; detected from the file when empty.")


class AugmentChecks(Section):
    """Automatic checks every generated candidate passes before a person sees it."""

    min_chars: int = Field(10, ge=0, description="Shortest candidate (its user and assistant turns), chars.")
    max_chars: int = Field(4000, ge=1, description="Longest candidate (its user and assistant turns), chars.")
    similarity: float = Field(
        0.7,
        gt=0,
        le=1,
        description="ROUGE-L F1 between user turns at or above which a candidate is a near duplicate "
        "of a seed or of the pool (accepted records and this round's earlier candidates).",
    )
    blocklist: list[str] = Field(
        default_factory=list,
        description="Case-insensitive words or phrases (matched as whole words) or regular expressions; "
        "a candidate containing one (in its turns or its reasoning) is rejected.",
    )
    min_reasoning_chars: int = Field(
        40, ge=1, description="cot mode: shortest step-by-step reasoning, characters (shorter is rejected)."
    )

    @model_validator(mode="after")
    def _blocklist_compiles(self) -> AugmentChecks:
        for entry in self.blocklist:
            try:
                re.compile(entry)
            except re.error as error:
                raise ValueError(
                    f"blocklist entry {entry!r} is not a valid regular expression: {error}; "
                    "escape special characters with a backslash"
                ) from None
        return self


SEED_PROMPT = """Here are examples of the task:

{examples}

Write {n} new examples of the same task. Vary the wording, the situations and the length, keep the \
style of the answers, and do not copy or closely paraphrase the examples.

Common mistakes to avoid:
{mistakes}"""

DOCUMENT_PROMPT = """Here is an extract of a document:

<document>
{document}
</document>

Write {n} question-and-answer pairs a reader of this document might ask. Each answer must be correct \
according to the extract alone, complete on its own, and must not mention "the extract" or "the \
document". Ask about different facts.

Common mistakes to avoid:
{mistakes}"""

COT_PROMPT = """Solve this task. Think it through step by step first, then give the final answer alone, \
in the form the task asks for (a label, a number, a sentence...).

<task>
{question}
</task>

Common mistakes to avoid:
{mistakes}"""

PROMPT_PLACEHOLDERS = {"examples", "document", "question", "n", "mistakes", "round"}
MATERIAL = {"seeds": "examples", "documents": "document", "cot": "question"}
DEFAULT_PROMPTS = {"seeds": SEED_PROMPT, "documents": DOCUMENT_PROMPT, "cot": COT_PROMPT}


class AugmentSpec(Section):
    """Teacher-generated examples in reviewed rounds, before cleaning.

    Each round asks the teacher for `per_round` candidates (in requests of `per_request`), checks
    them automatically, has them reviewed, and feeds the reject reasons and edits of all rounds so
    far back into the next prompt as common mistakes. It stops at `target_accepted`, at
    `max_rounds`, or when a round's acceptance falls below `min_acceptance_rate`.
    """

    mode: Literal["seeds", "documents", "cot"] = Field(
        "seeds",
        description="seeds: new examples like the seeds; documents: question/answer pairs grounded in "
        "the collected documents (crawl sources in documents mode), each keeping its URL; cot "
        "(chain-of-thought distillation): the teacher answers each seed's question with step-by-step "
        "reasoning and a final answer, kept as the assistant turn's reasoning_content and content.",
    )
    teacher: TeacherSpec
    review: ReviewSpec = ReviewSpec()
    seeds: SeedsSpec | None = Field(
        None,
        description="seeds and cot modes: seed file (cot: the questions to answer); when empty, the "
        "collected records are the seeds.",
    )
    system: str | None = Field(
        None,
        description="System prompt of the generated records; empty: the seeds' own if they all share one.",
    )
    prompt: str | None = Field(
        None,
        description="User prompt template with {examples} (seeds mode), {document} (documents mode) or "
        "{question} (cot mode), {mistakes}, and optionally {n} and {round}; literal braces are doubled. "
        "Empty: a default per mode.",
    )
    examples_per_request: int = Field(5, ge=1, le=50, description="seeds mode: seeds shown in each request.")
    chunk_chars: int = Field(2000, ge=200, description="documents mode: largest document chunk, characters.")
    per_round: int = Field(20, ge=1, le=1000, description="Candidates asked for in one round.")
    per_request: int = Field(
        5, ge=1, le=100, description="Candidates asked for in one teacher request (cot mode: always one)."
    )
    max_rounds: int = Field(5, ge=1, description="Rounds at most.")
    target_accepted: int = Field(100, ge=1, description="Stop once this many candidates were accepted.")
    min_acceptance_rate: float = Field(
        0.0, ge=0, le=1, description="Stop when a round accepts a smaller share of its candidates."
    )
    checks: AugmentChecks = AugmentChecks()

    def prompt_template(self) -> str:
        """The user prompt template in force: the recipe's, or the default for the mode."""
        if self.prompt is not None:
            return self.prompt
        return DEFAULT_PROMPTS[self.mode]

    @model_validator(mode="after")
    def _prompt_fits_mode(self) -> AugmentSpec:
        try:
            parsed = string.Formatter().parse(self.prompt_template())
            fields = {name for _, name, _, _ in parsed if name is not None}
        except ValueError as error:
            raise ValueError(f"prompt: {error}; write literal braces as {{{{ and }}}}") from None
        unknown = sorted(fields - PROMPT_PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"prompt: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; use "
                f"{', '.join('{' + n + '}' for n in sorted(PROMPT_PLACEHOLDERS))}, and double literal braces"
            )
        needed = {"mistakes", MATERIAL[self.mode]}
        if missing := sorted(needed - fields):
            raise ValueError(
                f"prompt: mode {self.mode} needs the placeholder(s) "
                f"{', '.join('{' + n + '}' for n in missing)} ({{mistakes}} carries earlier rounds' feedback)"
            )
        if self.mode == "documents" and self.seeds is not None:
            raise ValueError("seeds: only used in mode seeds; remove it or set mode: seeds")
        if self.per_request > self.per_round:
            raise ValueError(f"per_request {self.per_request} is larger than per_round {self.per_round}")
        return self
