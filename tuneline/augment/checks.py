"""The teacher exchange of one round: what is sent (material, prompts) and what comes back (schema, checks).

Seeds mode shows the teacher a few seed records per request (the seed file, else the collected
records); documents mode sends one chunk of a collected document per request, and each candidate
inherits that document's URL. The template is the recipe's, filled with {examples} or {document},
{mistakes} (the feedback of earlier rounds), {n} and {round}; the answer format is a fixed system
turn, so a custom template cannot break parsing.

The teacher answers one JSON object `{"candidates": [...]}`; each candidate is either an Alpaca-like
`{"instruction", "input", "output"}` or `{"messages": [{"role", "content"}, ...]}`. A reply that is
not that object is one rejected item (`parse_error`); inside a good reply every candidate is judged
on its own, so one bad candidate does not cost the other nineteen. The checks are small functions
that answer a reason or None, like the clean stage's filters: `missing_field`, `too_short`,
`too_long`, `blocklisted`, `near_duplicate_seed`, `near_duplicate_pool`.

Near duplicates are found with ROUGE-L (F1 of the longest common word subsequence) between user
turns, the measure Self-Instruct uses to keep generated instructions diverse: a candidate whose
question is at least `checks.similarity` ROUGE-L to a seed (or, in documents mode, a collected
record) or to the pool (records accepted earlier, or passed earlier in this round) is rejected. A
cheap upper bound (shared words) skips the quadratic comparison for pairs that cannot reach it.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneline.errors import UserError
from tuneline.formats import FormatError, read_records
from tuneline.formats.codecs import Format, parse_object
from tuneline.recipe import AugmentChecks, AugmentSpec
from tuneline.records import Record, RecordError, comparable_text, make_record
from tuneline.store import DOCUMENTS, StageRef, iter_jsonl, iter_records

WORD = re.compile(r"\w+")
MAX_WORDS = 256  # ROUGE-L cost grows with the product of lengths; questions are rarely longer
PLAIN_WORDS = re.compile(r"^[\w\s'-]+$")
NO_MISTAKES = "None noticed yet."

ANSWER_FORMAT = (
    "Answer with one JSON object and nothing else, in this shape:\n"
    '{"candidates": [{"instruction": "...", "input": "", "output": "..."}, ...]}\n'
    '"input" is optional extra context for the instruction. A multi-turn example is written as '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]} '
    "in place of instruction/input/output."
)


class TeacherMessage(BaseModel):
    """One turn of a multi-turn candidate."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str


class TeacherCandidate(BaseModel):
    """One generated example: instruction/input/output, or a list of messages."""

    model_config = ConfigDict(extra="forbid")

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: list[TeacherMessage] | None = None


class TeacherBatch(BaseModel):
    """A whole reply: the candidates, each validated on its own afterwards (see `candidate_record`)."""

    candidates: list[Any]


@dataclass(frozen=True)
class Verdict:
    """A candidate as a record, or the reason (a ledger key) and detail of why it is not one."""

    record: Record | None
    reason: str | None = None
    detail: str | None = None


def candidate_record(raw: Any, system: str | None, meta: dict[str, Any]) -> Verdict:
    """Turn one raw candidate of a reply into a canonical record (read by the Alpaca or OpenAI
    readers, so it looks exactly like collected data), or say why it cannot be one."""
    try:
        candidate = TeacherCandidate.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "candidate"
        return Verdict(None, "parse_error", f"{where}: {first['msg']}")
    if candidate.messages is not None:
        if candidate.instruction or candidate.output:
            return Verdict(None, "parse_error", "give instruction/output or messages, not both")
        turns = [{"role": "system", "content": system}] if system else []
        turns += [message.model_dump() for message in candidate.messages]
        obj, fmt = {"messages": turns}, Format.OPENAI
    else:
        missing = [name for name in ("instruction", "output") if not (getattr(candidate, name) or "").strip()]
        if missing:
            return Verdict(None, "missing_field", f"{' and '.join(missing)} missing or empty")
        obj = {
            "instruction": candidate.instruction,
            "input": candidate.input or "",
            "output": candidate.output,
        }
        if system:
            obj["system"] = system
        fmt = Format.ALPACA
    try:
        (conversation,) = parse_object(obj, fmt)
        if not any(m["role"] == "user" and m["content"].strip() for m in conversation.messages):
            raise RecordError("messages: no user turn")
        if not conversation.messages[-1]["content"].strip():
            raise RecordError("messages: the last assistant turn is empty")
        return Verdict(make_record(conversation.messages, None, dict(meta)))
    except RecordError as error:
        return Verdict(None, "missing_field", str(error))


def user_text(record: Record) -> str:
    """The user turns of a record: what near-duplicate checks compare (answers may rightly repeat)."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")


def words(text: str) -> list[str]:
    """Lower-cased word tokens, at most MAX_WORDS of them."""
    return WORD.findall(text.lower())[:MAX_WORDS]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (one-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for word in a:
        previous_diagonal = 0
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = previous_diagonal + 1 if word == other else max(row[j], row[j - 1])
            previous_diagonal = above
    return row[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over their words: 1.0 for the same words in the same order."""
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    return 2 * lcs_length(wa, wb) / (len(wa) + len(wb))


class SimilarityIndex:
    """Texts already taken (seeds, or the pool) and the first one a new text is near, by ROUGE-L.

    An inverted index (word -> entries and counts) gives each entry's shared word count with the
    query in one pass over the query's postings. The LCS cannot exceed that count, so only entries
    whose bound reaches the threshold get the quadratic comparison.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.entries: list[tuple[list[str], str]] = []
        self.postings: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)

    def add(self, text: str, label: str) -> None:
        tokens = words(text)
        if not tokens:
            return
        for word, count in Counter(tokens).items():
            self.postings[word].append((len(self.entries), count))
        self.entries.append((tokens, label))

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, text: str) -> tuple[float, str] | None:
        """(score, label) of the earliest entry at or above the threshold, or None."""
        tokens = words(text)
        if not tokens:
            return None
        shared: defaultdict[int, int] = defaultdict(int)
        for word, count in Counter(tokens).items():
            for index, other_count in self.postings.get(word, ()):
                shared[index] += min(count, other_count)
        bound = self.threshold * len(tokens)
        hits = [i for i, n in shared.items() if 2 * n >= bound + self.threshold * len(self.entries[i][0])]
        for index in sorted(hits):
            other, label = self.entries[index]
            score = 2 * lcs_length(tokens, other) / (len(tokens) + len(other))
            if score >= self.threshold:
                return score, label
        return None


def compile_blocklist(entries: list[str]) -> list[tuple[str, re.Pattern[str]]]:
    """Each blocklist entry and its case-insensitive pattern: plain words match as whole words,
    anything else is a regular expression."""
    compiled = []
    for entry in entries:
        pattern = rf"\b{re.escape(entry.strip())}\b" if PLAIN_WORDS.match(entry) else entry
        compiled.append((entry, re.compile(pattern, re.IGNORECASE)))
    return compiled


class CandidateChecks:
    """The automatic checks of one round: lengths, blocklist, near duplicates of seeds and pool.

    `check(record)` answers (reason, detail) or None; a record that passes joins the round's pool,
    so two near-identical candidates of the same round do not both reach the reviewer.
    """

    def __init__(self, checks: AugmentChecks, seeds: list[Record], pool: list[Record]) -> None:
        self.checks = checks
        self.blocklist = compile_blocklist(checks.blocklist)
        self.seeds = SimilarityIndex(checks.similarity)
        for seed in seeds:
            self.seeds.add(user_text(seed), f"seed {seed['id']}")
        self.pool = SimilarityIndex(checks.similarity)
        for record in pool:
            self.pool.add(user_text(record), f"accepted {record['id']}")

    def check(self, record: Record) -> tuple[str, str] | None:
        text = comparable_text(record)
        if len(text) < self.checks.min_chars:
            return "too_short", f"{len(text)} characters < checks.min_chars {self.checks.min_chars}"
        if len(text) > self.checks.max_chars:
            return "too_long", f"{len(text)} characters > checks.max_chars {self.checks.max_chars}"
        reasoning = "\n".join(m.get("reasoning_content", "") for m in record["messages"])
        for entry, pattern in self.blocklist:
            if found := pattern.search(f"{text}\n{reasoning}"):
                return (
                    "blocklisted",
                    f"blocklist entry {json.dumps(entry)} matched {json.dumps(found.group(0))}",
                )
        question = user_text(record)
        if hit := self.seeds.match(question):
            return "near_duplicate_seed", f"ROUGE-L {hit[0]:.2f} to {hit[1]}"
        if hit := self.pool.match(question):
            return "near_duplicate_pool", f"ROUGE-L {hit[0]:.2f} to {hit[1]}"
        self.pool.add(question, f"candidate {record['id']} of this round")
        return None


# How each automatic reject reason reads in the next prompt; teacher_error (a network failure)
# is no mistake of the teacher's writing and is left out.
AUTO_MISTAKES = {
    "parse_error": "the reply was not the requested JSON object, or a candidate had unknown or wrong fields",
    "missing_field": "a candidate left out, or left empty, its instruction, its output or a turn",
    "too_short": "an example was shorter than {bound} characters",
    "too_long": "an example was longer than {bound} characters",
    "blocklisted": "an example used the blocked phrase {entry}",
    "near_duplicate_seed": "an example copied or closely paraphrased one of the given examples",
    "near_duplicate_pool": "an example repeated one written before",
    "missing_answer": 'a reply left "answer" empty (the final answer must be stated there)',
    "missing_reasoning": 'a reply left "reasoning" empty',
    "reasoning_too_short": "the reasoning was shorter than {bound} characters",
    "answer_refers_to_reasoning": 'an answer pointed at the reasoning ("see above") instead of stating it',
    "reasoning_in_answer": "an answer repeated the reasoning; the answer must hold the final answer alone",
}
BOUND = re.compile(r"checks\.m(?:in|ax)_(?:reasoning_)?chars (\d+)$")
BLOCKED_ENTRY = re.compile(r'^blocklist entry ("(?:[^"\\]|\\.)*")')


def mistake_wording(reason: str, detail: str | None) -> str | None:
    """An automatic reject as the next prompt words it (with the bound or the blocked phrase taken
    from the detail `CandidateChecks` wrote); None for a reject that is not the teacher's doing."""
    template = AUTO_MISTAKES.get(reason)
    if template is None:
        return None
    bound = BOUND.search(detail or "")
    entry = BLOCKED_ENTRY.match(detail or "")
    return template.format(
        bound=bound.group(1) if bound else "the allowed number of",
        entry=entry.group(1) if entry else "on the blocklist",
    )


class AugmentError(UserError):
    """Augmentation cannot start or go on: no seeds, no documents, a decision that does not fit."""


@dataclass
class RoundRequest:
    """One request of a round: the messages sent, how many candidates it asks for, and the meta its
    candidates inherit (the document's URL and title when grounded)."""

    messages: list[dict[str, str]]
    n: int
    meta: dict[str, Any] = field(default_factory=dict)
    turns: list[dict[str, Any]] | None = None  # cot mode: the question the answer completes


# ---------------------------------------------------------------- material and prompts


def load_seeds(spec: AugmentSpec, source_ref: StageRef) -> tuple[list[Record], list[str]]:
    """The records the teacher imitates (seeds mode) or must not repeat: the seed file when the recipe
    names one, else the collected records; and the seed file's unreadable lines as `file:line: reason`."""
    if spec.seeds is None:
        return list(iter_records(source_ref)), []
    try:
        result = read_records(spec.seeds.path, spec.seeds.format, source="seeds")
    except (FormatError, OSError) as error:
        raise AugmentError(f"augment.seeds.path {spec.seeds.path}: {error}") from None
    if not result.records:
        raise AugmentError(
            f"augment.seeds.path {spec.seeds.path}: no readable seed record ({len(result.rejects)} "
            f"unreadable, first: {result.rejects[0] if result.rejects else 'none'}); fix the file"
        )
    return result.records, result.rejects


def split_text(text: str, limit: int) -> list[str]:
    """Chunks of at most `limit` characters, cut at paragraph, then line, then word boundaries."""
    chunks: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        pieces = [paragraph]
        while len(pieces[-1]) > limit:
            head = pieces.pop()
            cut = max(head.rfind("\n", 0, limit), head.rfind(" ", 0, limit))
            cut = cut if cut > limit // 2 else limit
            pieces += [head[:cut].strip(), head[cut:].strip()]
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > limit:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current.strip():
        chunks.append(current)
    return chunks


def document_chunks(source_ref: StageRef, chunk_chars: int) -> list[dict[str, Any]]:
    """The collect stage's documents cut into chunks, each with its document's URL and title."""
    chunks = []
    for document in iter_jsonl(source_ref.file(DOCUMENTS)):
        for index, text in enumerate(split_text(document.get("text") or "", chunk_chars)):
            meta = {"url": document.get("url"), "title": document.get("title"), "chunk": index}
            chunks.append({"text": text, **meta})
    if not chunks:
        raise AugmentError(
            "augment.mode is documents, but the collect stage holds no document text; add a crawl "
            "source with mode: documents (or use mode: seeds)"
        )
    return chunks


def example_object(record: Record) -> dict[str, Any]:
    """A record shown to the teacher in the shape it must answer in (system prompts left out)."""
    turns = [
        {"role": m["role"], "content": m["content"]} for m in record["messages"] if m["role"] != "system"
    ]
    if [m["role"] for m in turns] == ["user", "assistant"]:
        return {"instruction": turns[0]["content"], "output": turns[1]["content"]}
    return {"messages": turns}


def shared_system(spec: AugmentSpec, seeds: list[Record]) -> str | None:
    """System prompt of generated records: the recipe's, else the one every seed shares, else none."""
    if spec.system is not None:
        return spec.system
    systems = {next((m["content"] for m in s["messages"] if m["role"] == "system"), None) for s in seeds}
    return systems.pop() if len(systems) == 1 else None


def build_round_prompt(
    spec: AugmentSpec, material: list[Record] | dict[str, Any], mistakes: str, round_no: int, n: int
) -> list[dict[str, str]]:
    """The messages of one request: the answer format as system turn, the recipe's template filled
    with the seed examples (a list of records) or the document chunk (a dict), the mistakes and n."""
    if isinstance(material, dict):
        examples, document = "", material["text"]
    else:
        examples = "\n".join(json.dumps(example_object(r), ensure_ascii=False) for r in material)
        document = ""
    user = spec.prompt_template().format(
        examples=examples,
        document=document,
        question="",
        n=n,
        mistakes=mistakes or NO_MISTAKES,
        round=round_no,
    )
    system = f"You write training examples for fine-tuning a language model.\n{ANSWER_FORMAT}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def plan_round(
    spec: AugmentSpec, seeds: list[Record], chunks: list[dict[str, Any]], mistakes: str, round_no: int
) -> list[RoundRequest]:
    """The round's requests: `per_round` candidates in requests of `per_request`, each showing its own
    sample of seeds (chosen by round and request number, so a re-run asks the same) or the next
    document chunk (chunks are taken in turn across rounds)."""
    count = math.ceil(spec.per_round / spec.per_request)
    requests = []
    for index in range(count):
        n = min(spec.per_request, spec.per_round - index * spec.per_request)
        if spec.mode == "documents":
            chunk = chunks[((round_no - 1) * count + index) % len(chunks)]
            meta = {"url": chunk["url"], "title": chunk["title"], "chunk": chunk["chunk"]}
            requests.append(RoundRequest(build_round_prompt(spec, chunk, mistakes, round_no, n), n, meta))
        else:
            sample = random.Random(f"{round_no}:{index}").sample(
                seeds, min(spec.examples_per_request, len(seeds))
            )
            requests.append(RoundRequest(build_round_prompt(spec, sample, mistakes, round_no, n), n))
    return requests
