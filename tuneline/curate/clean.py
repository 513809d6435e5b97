"""The clean stage: repair text, then drop what cannot train well, each drop with its reason.

Repairs keep the record and are counted in stats: mojibake (ftfy), control and zero-width
characters, whitespace normalization, HTML tags and entities in text from web pages (markup that
is content never: code, or an instruction that asks for markup), PII per the recipe's action per
kind (tuneline.curate.pii: redact, drop, report; counts by kind). Filters are
small functions `record -> reason | None`; the stage counts drops by reason in the ledger and
quarantines each dropped record in rejects.jsonl. Then exact dedup (normalized content id) and
near-dedup (MinHash LSH), first occurrence kept.

Records stream through in batches of `clean.batch_size`: memory holds one batch plus the dedup
indexes (a set of ids and of LSH band hashes), whatever the input size. Language identification
(lingua, offline) and tokenization (the base model's tokenizer) run only when the recipe asks.
"""

from __future__ import annotations

import functools
import html
import json
import multiprocessing
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import chain, islice
from pathlib import Path
from typing import Any

import ftfy
from lxml.html.defs import html5_tags, tags

from tuneline.curate import shards
from tuneline.curate.dedup import NearDedup, choose_bands, lsh_keys
from tuneline.curate.pii import Redactor
from tuneline.errors import UserError
from tuneline.pipeline import CLEAN
from tuneline.recipe import PII_KINDS, CleanSpec, ModelSpec, PiiSpec
from tuneline.records import Record, comparable_text, content_digest, record_text
from tuneline.store import RECORDS, StageRef, StageWriter, reuse_or_write, stage_key

Filter = Callable[[Record], str | None]

CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)
TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")
HTML_TAG = re.compile(
    r"<(?:script|style)\b[^>]{0,500}>.{0,100000}?</(?:script|style)>|<!--.{0,100000}?-->"
    r"|</?([A-Za-z][A-Za-z0-9]{0,20})\b[^<>]{0,500}>",
    re.DOTALL | re.IGNORECASE,
)
# Only real element names (lxml's lists) are tags: `<analogy>`, `<Song>`, `<stdio.h>` are text.
HTML_ELEMENTS = frozenset(tags | html5_tags)
# Markdown code: fenced blocks (to their closing fence, or the end) and inline code spans.
CODE_SPAN = re.compile(
    r"^[ \t]{0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]{0,3}\1[ \t]*$|\Z)"
    r"|(?<!`)(`{1,3})(?!`)[^\n]{1,2000}?(?<!`)\2(?!`)",
    re.DOTALL | re.MULTILINE,
)
# An instruction that names markup asks for it: then the answer's tags are the content.
ASKS_FOR_MARKUP = re.compile(
    r"\b(?:x?html5?|xml|svg|css|markup|markdown|jsx|tsx|dom|tags?|web ?pages?|websites?|doctype)\b",
    re.IGNORECASE,
)
# `meta.source_kind` of records taken from web pages (set by collect), the ones `html: auto` strips.
WEB_SOURCE_KINDS = frozenset({"crawl"})
# Characters that UTF-8 read as Latin-1/Windows-1252 leaves behind; ftfy runs only where they occur.
MOJIBAKE_HINT = re.compile("[\u00c2\u00c3\u00c5\u00c4\u00ce\u00cf\u00d0\u00d1\u00d8\u00d9\u00e2\u00ef\ufffd]")
HTML_ENTITY = re.compile(r"&(?:[A-Za-z]{2,8}|#\d{1,7}|#[xX][0-9A-Fa-f]{1,6});")
LANGUAGE_SAMPLE_CHARS = 1000


class CleanConfigError(UserError, ValueError):
    """The clean section asks for something the rest of the recipe does not provide."""


def repair_text(
    text: str, spec: CleanSpec, repairs: Counter[str], strip_html: bool = False, keep_layout: bool = False
) -> str:
    """One turn's text after the repairs the recipe turns on; `repairs` counts each kind. Whether
    markup is content is the record's call: HTML is stripped (outside code) only when `strip_html`,
    and with `keep_layout` (markup asked for) spaces and blank lines inside the text stay as in code."""
    if spec.fix_mojibake and not text.isascii() and MOJIBAKE_HINT.search(text):
        fixed = ftfy.fix_encoding(text)
        if fixed != text:
            repairs["mojibake"] += 1
            text = fixed
    if spec.strip_control and CONTROL.search(text):
        text = CONTROL.sub("", text)
        repairs["control_chars"] += 1
    if strip_html and ("<" in text or "&" in text):
        stripped = outside_code(text, strip_markup)
        if stripped != text:
            repairs["html"] += 1
            text = stripped
    if spec.normalize_text:
        before = text
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not keep_layout and (" \n" in text or "\t\n" in text or "\n\n\n" in text):
            text = outside_code(text, squeeze_whitespace)  # blank lines in code are the code's
        text = text.strip()
        if text != before:
            repairs["whitespace"] += 1
    return text


def squeeze_whitespace(text: str) -> str:
    """No spaces or tabs at line ends, at most one blank line in a row."""
    return BLANK_LINES.sub("\n\n", TRAILING_SPACE.sub("\n", text))


def _strip_tag(match: re.Match[str]) -> str:
    name = match.group(1)
    return "" if name is None or name.lower() in HTML_ELEMENTS else match.group()


def strip_markup(text: str) -> str:
    """Text without HTML element tags, script/style blocks and comments, entities decoded."""
    if "<" in text and HTML_TAG.search(text):
        text = HTML_TAG.sub(_strip_tag, text)
    return html.unescape(text) if "&" in text and HTML_ENTITY.search(text) else text


def outside_code(text: str, change: Callable[[str], str]) -> str:
    """The text with `change` applied everywhere but inside Markdown code fences and inline code."""
    if "`" not in text and "~~~" not in text:
        return change(text)
    parts, start = [], 0
    for match in CODE_SPAN.finditer(text):
        parts += [change(text[start : match.start()]), match.group()]
        start = match.end()
    return "".join([*parts, change(text[start:])])


def markup_is_content(record: Record) -> bool:
    """A user or system turn asks for markup (HTML, XML, CSS, tags...): the answer's tags are the content."""
    return any(
        m["role"] in ("user", "system") and ASKS_FOR_MARKUP.search(m["content"]) for m in record["messages"]
    )


def strips_html(record: Record, spec: CleanSpec) -> bool:
    """Whether `clean.html` strips this record's tags: `strip` in every record, `auto` only in text
    taken from web pages (meta.source_kind, set by collect)."""
    if spec.html == "auto":
        return (record.get("meta") or {}).get("source_kind") in WEB_SOURCE_KINDS
    return spec.html == "strip"


def repair_record(record: Record, spec: CleanSpec, repairs: Counter[str]) -> Record:
    """The record with every turn repaired; the id follows the new content. Where markup is the
    content, no tag is stripped and the layout stays."""
    contents = [m["content"] for m in record["messages"]]
    layout = spec.normalize_text and any(" \n" in c or "\t\n" in c or "\n\n\n" in c for c in contents)
    web = strips_html(record, spec)
    markup = (layout or web) and markup_is_content(record)  # the regex only where it decides something
    strip_html = web and not markup
    messages = [
        {**m, "content": repair_text(m["content"], spec, repairs, strip_html, markup)}
        for m in record["messages"]
    ]
    return {**record, "messages": messages, "id": content_digest(messages, record.get("tools"))}


@functools.lru_cache(maxsize=8)
def pii_actions(pii: PiiSpec) -> dict[str, str]:
    """`clean.pii` as {kind: action}, computed once per spec rather than once per record."""
    return pii.model_dump()


def handle_pii(record: Record, spec: CleanSpec, counts: Counter[str]) -> tuple[Record, str | None]:
    """The record with PII handled as `clean.pii` says per kind: redacted in every turn, its
    reasoning and tool-call arguments (still valid JSON), or the record dropped as `pii_<kind>`;
    `counts` gains `redact:<kind>` / `report:<kind>` per find."""
    actions = pii_actions(spec.pii)
    redactor = Redactor(actions, lambda: json.dumps(record["messages"], ensure_ascii=False))
    messages, changed = [], False
    for message in record["messages"]:
        content = message["content"]
        new = redactor.json_text(content) if message["role"] == "tool" else redactor.text(content)
        calls = message.get("tool_calls")
        new_calls = [_redact_call(call, redactor) for call in calls] if isinstance(calls, list) else calls
        reasoning = message.get("reasoning_content")  # a distilled answer's reasoning is text too
        new_reasoning = redactor.text(reasoning) if isinstance(reasoning, str) else reasoning
        if new != content or new_calls != calls or new_reasoning != reasoning:
            changed = True
            message = {**message, "content": new, **({"tool_calls": new_calls} if calls is not None else {})}
            if reasoning is not None:
                message["reasoning_content"] = new_reasoning
        messages.append(message)
    dropped = [kind for kind in PII_KINDS if redactor.found[kind] and actions[kind] == "drop"]
    if dropped:
        return record, f"pii_{dropped[0]}"
    for kind, found in redactor.found.items():
        counts[f"{actions[kind]}:{kind}"] += found
    if not changed:
        return record, None
    return {**record, "messages": messages, "id": content_digest(messages, record.get("tools"))}, None


def _redact_call(call: Any, redactor: Redactor) -> Any:
    if isinstance(call, dict) and isinstance(call.get("arguments"), str):
        arguments = redactor.json_text(call["arguments"])
        return call if arguments == call["arguments"] else {**call, "arguments": arguments}
    return call


def normalize_record(record: Record) -> Record:
    """NFC-normalize and trim every turn, unify newlines; the id follows the new content."""
    return repair_record(record, CleanSpec(fix_mojibake=False, strip_control=False, html="keep"), Counter())


def empty_turn(record: Record) -> str | None:
    """A user or assistant turn with no text teaches nothing (tool-call turns may be empty)."""
    for message in record["messages"]:
        if message["role"] in ("user", "assistant") and not message["content"].strip():
            if message.get("tool_calls"):
                continue
            return "empty_turn"
    return None


def punctuation_answer(record: Record) -> str | None:
    """An answer that is one punctuation mark ('.', '?', '-', '…') says nothing: a cut-off or broken
    generation. One letter or digit ('A', '5', '好') is kept: classification labels and multiple-
    choice answers are that short; so is one symbol ('+', '$', an emoji), which can answer too."""
    for message in record["messages"]:
        text = message["content"].strip() if message["role"] == "assistant" else ""
        if len(text) == 1 and not message.get("tool_calls") and unicodedata.category(text)[0] == "P":
            return "punctuation_answer"
    return None


def _tool_calls_ok(calls: Any) -> bool:
    if not isinstance(calls, list) or not calls:
        return False
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return False
        try:
            json.loads(call.get("arguments") or "{}")
        except (TypeError, ValueError):
            return False
    return True


# Which role may follow which: a tool result answers the assistant's call, then the assistant resumes.
NEXT_ROLES = {"user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}


def conversation_structure(record: Record) -> str | None:
    """Roles alternate user/assistant after an optional first system turn, the last turn is the
    assistant's, and tool turns follow an assistant tool call whose calls are well formed."""
    messages = record["messages"]
    if any(m["role"] == "system" for m in messages[1:]):
        return "system_not_first"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "assistant":
        return "last_turn_not_assistant"
    if body[0]["role"] != "user":
        return "roles_out_of_order"
    for previous, current in zip(body, body[1:], strict=False):
        if current["role"] not in NEXT_ROLES[previous["role"]]:
            return (
                "tool_turn_malformed"
                if "tool" in (current["role"], previous["role"])
                else "roles_out_of_order"
            )
        if current["role"] == "tool" and previous["role"] == "assistant" and not previous.get("tool_calls"):
            return "tool_turn_malformed"
    for message in body:
        if (
            "tool_calls" in message
            and message["tool_calls"] is not None
            and not _tool_calls_ok(message["tool_calls"])
        ):
            return "tool_turn_malformed"
    return None


def html_remnants(record: Record) -> str | None:
    """With `clean.html: drop`: a record that holds HTML tags or entities outside code, unless
    its instruction asks for markup."""
    if markup_is_content(record):
        return None
    for message in record["messages"]:
        text = message["content"]
        if ("<" in text or "&" in text) and outside_code(text, strip_markup) != text:
            return "html_remnants"
    return None


def truncate_last_turn(record: Record, keep_chars: int) -> Record:
    """The record with its last turn cut to `keep_chars` characters; the id follows."""
    messages = [*record["messages"][:-1], {**record["messages"][-1]}]
    messages[-1]["content"] = messages[-1]["content"][: max(keep_chars, 0)]
    return {**record, "messages": messages, "id": content_digest(messages, record.get("tools"))}


def length_bounds(spec: CleanSpec) -> Callable[[Record], tuple[Record, str | None]]:
    """Conversations shorter than min_chars, or longer than max_chars (dropped, or the last turn
    truncated when `over_length: truncate` and that is enough)."""

    def check(record: Record) -> tuple[Record, str | None]:
        size = len(record_text(record))
        if size < spec.min_chars:
            return record, "too_short"
        if size <= spec.max_chars:
            return record, None
        if spec.over_length == "truncate":
            last = len(record["messages"][-1]["content"])
            cut = truncate_last_turn(record, last - (size - spec.max_chars))
            if cut["messages"][-1]["content"].strip() and len(record_text(cut)) <= spec.max_chars:
                cut["meta"] = {**cut.get("meta", {}), "truncated": "chars"}
                return cut, None
        return record, "too_long"

    return check


class TokenCounter:
    """Counts (and truncates to) base-model tokens; the tokenizer loads on first use."""

    def __init__(self, spec: CleanSpec, model: ModelSpec | None) -> None:
        if model is None:
            raise CleanConfigError(
                "clean.max_tokens / clean.min_tokens: counting tokens needs the recipe's `model` "
                "section (the base model's tokenizer); pass it, or leave the token bounds unset"
            )
        from tuneline.models import load_tokenizer

        self.spec = spec
        self.tokenizer = load_tokenizer(model)

    def counts(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def check(self, record: Record, tokens: int) -> tuple[Record, str | None]:
        spec = self.spec
        if tokens < spec.min_tokens:
            return record, "too_few_tokens"
        if spec.max_tokens is None or tokens <= spec.max_tokens:
            return record, None
        if spec.over_length == "truncate":
            last = record["messages"][-1]["content"]
            ids = self.tokenizer(last, add_special_tokens=False)["input_ids"]
            keep = len(ids) - (tokens - spec.max_tokens)
            if keep > 0:
                messages = [*record["messages"][:-1], {**record["messages"][-1]}]
                messages[-1]["content"] = self.tokenizer.decode(ids[:keep])
                meta = {**record.get("meta", {}), "truncated": "tokens", "tokens": spec.max_tokens}
                cut = {**record, "messages": messages, "meta": meta}
                return {**cut, "id": content_digest(messages, record.get("tools"))}, None
        return record, "too_many_tokens"


class LanguageFilter:
    """Offline language identification with lingua (models ship inside the wheel)."""

    def __init__(self, spec: CleanSpec) -> None:
        from lingua import Language, LanguageDetectorBuilder

        known = {language.iso_code_639_1.name.lower() for language in Language.all()}
        unknown = sorted(set(spec.languages) - known)
        if unknown:
            raise CleanConfigError(f"clean.languages: {unknown} are not ISO 639-1 codes (e.g. en, de, fr)")
        self.spec = spec
        self.detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()

    def detect(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language code, confidence) of each text; ("und", 0.0) when nothing is recognised."""
        results = self.detector.compute_language_confidence_values_in_parallel(
            [t[:LANGUAGE_SAMPLE_CHARS] for t in texts]
        )
        return [
            (top[0].language.iso_code_639_1.name.lower(), top[0].value) if top else ("und", 0.0)
            for top in results
        ]

    def reason(self, language: str, confidence: float) -> str | None:
        if confidence < self.spec.min_language_confidence:
            return "language_unsure"
        return None if language in self.spec.languages else "language_not_allowed"


def batches(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def record_filters(spec: CleanSpec) -> list[Filter]:
    """The per-record filters the recipe turns on, in the order they are tried."""
    filters: list[Filter] = [conversation_structure] if spec.check_structure else []
    filters += [empty_turn, punctuation_answer]
    if spec.html == "drop":
        filters.append(html_remnants)
    return filters


def prepare_batch(
    spec: CleanSpec, items: list[Record] | list[str]
) -> tuple[list[list[Any]], Counter[str], Any]:
    """The stateless part of cleaning one batch (records, or their JSON lines): repairs, filters,
    length bounds, and each record's near-dedup LSH keys. Pure and picklable, so worker processes
    run it while the stage's process keeps the dedup indexes and writes."""
    repairs: Counter[str] = Counter()
    filters = record_filters(spec)
    lengths = length_bounds(spec)
    results: list[list[Any]] = []
    for item in items:
        record = repair_record(json.loads(item) if isinstance(item, str) else item, spec, repairs)
        record, reason = handle_pii(record, spec, repairs)
        reason = reason or next((r for f in filters if (r := f(record))), None)
        if reason is None:
            record, reason = lengths(record)
        results.append([record, reason])
    keys = None
    if spec.near_dedup:
        bands = choose_bands(spec.near_dedup_permutations, spec.near_dedup_threshold)
        texts = [comparable_text(record) for record, _ in results]
        keys = lsh_keys(texts, spec.near_dedup_ngram, spec.near_dedup_permutations, bands)
    return results, repairs, keys


class Cleaner:
    """The clean stage's logic over batches, independent of where records come from or go to.

    `clean_batch(records)` returns one `(record, reason | None)` per input record, in order;
    `finish_batch(prepare_batch(...))` is the same in two steps, the first one anywhere (a worker
    process). `stats()` gives the repair and PII counts. Used by the stage and `tuneline data check`.
    """

    def __init__(self, spec: CleanSpec, model: ModelSpec | None = None) -> None:
        self.spec = spec
        self.repairs: Counter[str] = Counter()
        self.tokens = TokenCounter(spec, model) if spec.max_tokens or spec.min_tokens else None
        self.language = LanguageFilter(spec) if spec.languages else None
        self.seen: set[str] = set()
        self.near = (
            NearDedup(spec.near_dedup_threshold, spec.near_dedup_ngram, spec.near_dedup_permutations)
            if spec.near_dedup
            else None
        )

    def clean_batch(self, records: list[Record]) -> list[tuple[Record, str | None]]:
        return self.finish_batch(prepare_batch(self.spec, records))

    def finish_batch(
        self, prepared: tuple[list[list[Any]], Counter[str], Any]
    ) -> list[tuple[Record, str | None]]:
        """Token and language checks, then exact and near dedup against every earlier batch."""
        results, repairs, keys = prepared
        self.repairs.update(repairs)
        self.check_records(results, self.repairs)
        for item in results:
            if item[1] is None and self.spec.dedup:
                if item[0]["id"] in self.seen:
                    item[1] = "duplicate"
                self.seen.add(item[0]["id"])
        if self.near is not None:
            alive = [item[1] is None for item in results]
            for item, near in zip(results, self.near.flags_from_keys(keys, alive), strict=True):
                if near:
                    item[1] = "near_duplicate"
        return [(record, reason) for record, reason in results]

    def check_records(self, results: list[list[Any]], repairs: Counter[str]) -> None:
        """Token and language checks of a prepared batch's surviving records, in place; `repairs`
        counts truncations. Needs no other batch, so a Dask worker runs it on its shard."""
        alive = [item for item in results if item[1] is None]
        if self.tokens is not None and alive:
            self._token_step(alive, repairs)
        alive = [item for item in alive if item[1] is None]
        if self.language is not None and alive:
            self._language_step(alive)

    def _token_step(self, alive: list[list[Any]], repairs: Counter[str]) -> None:
        assert self.tokens is not None
        counts = self.tokens.counts([record_text(item[0]) for item in alive])
        for item, count in zip(alive, counts, strict=True):
            item[0] = {**item[0], "meta": {**item[0].get("meta", {}), "tokens": count}}
            item[0], item[1] = self.tokens.check(item[0], count)
            if item[0].get("meta", {}).get("truncated"):
                repairs["truncated"] += 1

    def _language_step(self, alive: list[list[Any]]) -> None:
        assert self.language is not None
        detected = self.language.detect([record_text(item[0]) for item in alive])
        for item, (language, confidence) in zip(alive, detected, strict=True):
            item[0] = {**item[0], "meta": {**item[0].get("meta", {}), "language": language}}
            item[1] = self.language.reason(language, confidence)

    def stats(self) -> dict[str, Any]:
        return repair_stats(self.spec, self.repairs)


def repair_stats(spec: CleanSpec, repairs: Counter[str]) -> dict[str, Any]:
    """Repairs by kind, and PII finds by kind: redacted, and only reported (records dropped for
    PII are in the ledger as pii_<kind>)."""
    actions = pii_actions(spec.pii)
    repaired = {k: v for k, v in repairs.items() if ":" not in k}
    return {
        "repaired": dict(sorted(repaired.items())),
        "pii_redacted": {k: repairs[f"redact:{k}"] for k in PII_KINDS if actions[k] == "redact"},
        "pii_reported": {k: repairs[f"report:{k}"] for k in PII_KINDS if actions[k] == "report"},
    }


def line_batches(path: Path, size: int) -> Iterator[list[str]]:
    """The JSON lines of a stage file, `size` at a time, unparsed (workers parse them)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        while batch := list(islice(handle, size)):
            yield batch


def prepared_batches(
    spec: CleanSpec, path: Path
) -> Iterator[tuple[int, tuple[list[list[Any]], Counter[str], Any]]]:
    """(batch length, prepared batch) in file order. With `clean.workers` > 1 and more than one
    batch, worker processes prepare them, at most two batches ahead per worker (memory stays flat)."""
    lines = line_batches(path, spec.batch_size)
    first = next(lines, None)
    second = next(lines, None) if first is not None else None
    if first is None:
        return
    if second is None or spec.workers == 1:
        for batch in chain((first,), () if second is None else (second,), lines):
            yield len(batch), prepare_batch(spec, batch)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    with ProcessPoolExecutor(max_workers=spec.workers, mp_context=context) as pool:
        pending: deque[tuple[int, Future[Any]]] = deque()
        for batch in chain((first, second), lines):  # lazily: never the whole file at once
            pending.append((len(batch), pool.submit(prepare_batch, spec, batch)))
            if len(pending) >= 2 * spec.workers:
                size, future = pending.popleft()
                yield size, future.result()
        while pending:
            size, future = pending.popleft()
            yield size, future.result()


_shard_cleaners: dict[str, Cleaner] = {}


def clean_shard(spec: CleanSpec, model: ModelSpec | None, lines: list[str]) -> Any:
    """On a Dask worker: one shard (JSON lines) through every per-record step, with its records'
    LSH band hashes; dedup is left to the stage's process, which sees every shard. One Cleaner
    per worker process and recipe, so a tokenizer or language detector loads once."""
    key = json.dumps([spec.model_dump(mode="json"), model.model_dump(mode="json") if model else None])
    if key not in _shard_cleaners:
        _shard_cleaners.clear()
        _shard_cleaners[key] = Cleaner(spec, model)
    results, repairs, keys = prepare_batch(spec, lines)
    _shard_cleaners[key].check_records(results, repairs)
    return results, repairs, keys


def run_clean(
    artifacts_dir: str | Path, collected: StageRef, spec: CleanSpec, model: ModelSpec | None = None
) -> StageRef:
    """Repair, filter, exact- and near-dedup the collected records into a new stage, in batches
    (shards): on this machine, or on Dask with `clean.executor: dask` (same records, same reasons,
    so the digest leaves the executor out). stats.json holds each shard's ledger."""
    tokenizer_part = model if (spec.max_tokens or spec.min_tokens) else None
    where = {"executor": "local", "dask_address": None}  # decides no output: same digest for all
    digest = stage_key(CLEAN, spec.model_copy(update=where), tokenizer_part, collected.digest)

    def write(writer: StageWriter) -> None:
        if spec.executor == "dask":
            batches = line_batches(collected.file(RECORDS), spec.batch_size)
            task = functools.partial(clean_shard, spec, model)
            repairs, ledgers = shards.write_sharded(writer, spec, batches, task)
        else:
            cleaner = Cleaner(spec, model)
            ledgers = []
            for size, prepared in prepared_batches(spec, collected.file(RECORDS)):
                writer.count_in(size)
                ledgers.append(shards.write_shard(writer, cleaner.finish_batch(prepared)))
            repairs = cleaner.repairs
        shards.finish_stats(writer, repair_stats(spec, repairs), ledgers)

    return reuse_or_write(artifacts_dir, CLEAN, digest, write, [collected])
