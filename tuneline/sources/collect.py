"""The collect stage: every source's fetched data merged into canonical records and documents.

Each source was fetched into a stage of its own (tuneline.sources.fetch); collect reads them in recipe
order. Files, downloads and Hugging Face rows go through the format readers; crawled FAQ pairs
become two-turn conversations; crawled pages and text files (format `text`: `{"text": ...}` lines,
plain `.txt`/`.md`) become documents (`documents.jsonl`: title, text, URL) that later stages can
ground generation and pre-train on. Every record carries its source, URL and fetch
time in meta. Nothing disappears: an unreadable record goes to rejects with `file:line: reason`,
a crawl's drops are carried over with their reasons. The manifest's ledger counts conversation
records; documents keep a ledger of their own in stats.json, so the next stage's intake still
equals this stage's output.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneline.formats import Format, FormatError, UnpackLimits, iter_documents, iter_file, peek_format
from tuneline.pipeline import COLLECT
from tuneline.recipe import CrawlSource, FileSource, HfSource, Source, UrlSource
from tuneline.records import RecordError, make_record
from tuneline.sources.crawl import ITEMS
from tuneline.sources.errors import SourceError, SourceUnreachable, source_os_error
from tuneline.sources.fetch import ROWS, path_fingerprint, run_fetch
from tuneline.store import (
    DOCUMENTS,
    REJECTS,
    StageRef,
    StageWriter,
    check_ledger_counts,
    iter_records,
    read_stats,
    reuse_or_write,
    stage_key,
)

__all__ = ["DOCUMENTS", "SourceError", "SourceUnreachable", "run_collect", "source_fingerprint"]

DOCUMENT_REJECTS = "documents_rejects.jsonl"


def source_fingerprint(source: FileSource) -> dict[str, Any]:
    """What identifies a file source's content: a sha256 for local files, size and ETag for URLs."""
    return path_fingerprint(source.name, source.path)


class SourceCounts:
    """One source's tally: records and documents kept, and drops by reason."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.records = 0
        self.documents = 0
        self.dropped: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "records": self.records, "documents": self.documents,
                "dropped": dict(sorted(self.dropped.items()))}  # fmt: skip


class DocumentSink:
    """documents.jsonl and its own ledger (in = out + dropped), beside the records'."""

    def __init__(self, writer: StageWriter) -> None:
        self.writer = writer
        self.count_in = 0
        self.out = 0
        self.dropped: Counter[str] = Counter()
        self._files: dict[str, Any] = {}

    def _line(self, name: str, row: dict[str, Any]) -> None:
        if name not in self._files:
            self._files[name] = open(self.writer.path(name), "w", encoding="utf-8")  # noqa: SIM115
        self._files[name].write(json.dumps(row, ensure_ascii=False) + "\n")

    def keep(self, document: dict[str, Any]) -> None:
        self.count_in += 1
        self.out += 1
        self._line(DOCUMENTS, document)

    def drop(self, row: dict[str, Any], reason: str, detail: str) -> None:
        self.count_in += 1
        self.dropped[reason] += 1
        self._line(DOCUMENT_REJECTS, {"reason": reason, "detail": detail, "record": row})

    def close(self) -> dict[str, Any]:
        for handle in self._files.values():
            handle.close()
        check_ledger_counts("collect (documents)", self.count_in, self.out, self.dropped)
        return {"in": self.count_in, "out": self.out, "dropped": dict(sorted(self.dropped.items()))}


def run_collect(
    artifacts_dir: str | Path, sources: list[Source], fetched: list[StageRef] | None = None
) -> StageRef:
    """Merge the fetched sources (fetching any not given) into records.jsonl and documents.jsonl."""
    if fetched is None:
        fetched = [run_fetch(artifacts_dir, source) for source in sources]
    digest = stage_key(COLLECT, sources, [ref.digest for ref in fetched])

    # The fetch stages are named in stats.json, not as manifest inputs: lineage follows a chain of
    # first inputs (split <- ... <- collect), and collect fans in from one fetch per source.
    def write(writer: StageWriter) -> None:
        per_source: dict[str, dict[str, Any]] = {}
        documents = DocumentSink(writer)
        for source, ref in zip(sources, fetched, strict=True):
            counts = SourceCounts(source.kind)
            match source:
                case FileSource():
                    sinks = Sinks(writer, documents, counts)
                    read_files(sinks, source, [source.path], source.path, now(), unpack_limits(source))
                case UrlSource():
                    stats = read_stats(ref)
                    paths = [str(ref.file(name)) for name in stats["files"]]
                    limits = unpack_limits(source)
                    sinks = Sinks(writer, documents, counts)
                    read_files(sinks, source, paths, source.url, stats["fetched_at"], limits)
                case HfSource():
                    stats = read_stats(ref)
                    rows = [str(ref.file(ROWS))]  # written by the fetch stage: plain JSON lines
                    sinks = Sinks(writer, documents, counts)
                    read_files(sinks, source, rows, source.dataset, stats["fetched_at"], UnpackLimits())
                case CrawlSource():
                    read_crawl(writer, documents, source, ref, counts)
            per_source[source.name] = {**counts.as_dict(), "fetch": ref.digest}
        writer.stats = {"sources": per_source, "documents": documents.close()}

    return reuse_or_write(artifacts_dir, COLLECT, digest, write)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def unpack_limits(source: FileSource | UrlSource) -> UnpackLimits:
    """How far the source's compressed files may unpack, from its recipe fields."""
    return UnpackLimits(source.max_unpacked_bytes, source.max_ratio)


@dataclass(frozen=True)
class Sinks:
    """Where one source's reading goes: records, documents, and the source's tally."""

    records: StageWriter
    documents: DocumentSink
    counts: SourceCounts


def read_files(
    sinks: Sinks, source: Source, paths: list[str], url: str, fetched_at: str, limits: UnpackLimits
) -> None:
    """Records of dataset files, or documents of text files; unreadable ones to rejects with
    `file:line: reason`."""
    writer, counts = sinks.records, sinks.counts
    for path in paths:
        try:
            if (source.format or peek_format(path, limits)) == Format.TEXT:
                read_documents(sinks.documents, source, path, url, fetched_at, counts, limits)
                continue
            for item in iter_file(path, source.format, source.name, limits):
                writer.count_in()
                if item.record is None:
                    writer.drop(
                        {"source": source.name, "line": item.line},
                        "unreadable",
                        f"{path}:{item.line}: {item.reason}",
                    )
                    counts.dropped["unreadable"] += 1
                else:
                    item.record["meta"].update(url=url, fetched_at=fetched_at)
                    writer.keep(item.record)
                    counts.records += 1
        except FormatError as error:
            raise SourceError(f"source {source.name!r}: {error}") from None
        except (OSError, TimeoutError) as error:
            raise source_os_error(source.name, path, error) from error
    if not (counts.records or counts.documents or counts.dropped):
        raise SourceError(empty_source_message(source.name, url, paths))


def empty_source_message(name: str, url: str, paths: list[str]) -> str:
    """The error for a source whose files hold nothing at all: naming the source and its files."""
    read_from = "" if paths == [url] else f" (read from {', '.join(paths)})"
    return (
        f"source {name!r}: {url}{read_from} holds no records (the file is empty, blank or an empty "
        "JSON array); check the file, or remove the source from the recipe"
    )


def read_documents(
    documents: DocumentSink,
    source: Source,
    path: str,
    url: str,
    fetched_at: str,
    counts: SourceCounts,
    limits: UnpackLimits,
) -> None:
    """A text file's documents (or its unusable objects and lines, with `file:line: reason`)."""
    for item in iter_documents(path, source.format, source.name, limits):
        if item.document is None:
            where = {"source": source.name, "line": item.line}
            documents.drop(where, "unreadable", f"{path}:{item.line}: {item.reason}")
            counts.dropped["unreadable"] += 1
        else:
            documents.keep({**item.document, "url": url, "fetched_at": fetched_at})
            counts.documents += 1


def read_crawl(
    writer: StageWriter, documents: DocumentSink, source: CrawlSource, ref: StageRef, counts: SourceCounts
) -> None:
    """A crawl's items as documents or pair conversations; its drops carried over with their reasons."""
    for reject in iter_records(ref, REJECTS):
        row = {"source": source.name, **reject["record"]}
        if source.mode == "documents":
            documents.drop(row, reject["reason"], reject["detail"])
        else:
            writer.count_in()
            writer.drop(row, reject["reason"], reject["detail"])
        counts.dropped[reject["reason"]] += 1
    for item in iter_records(ref, ITEMS):
        meta = {"source": source.name, "source_kind": "crawl", "origin": "collected", "url": item["url"],
                "fetched_at": item["fetched_at"], "title": item.get("title")}  # fmt: skip
        if source.mode == "documents":
            documents.keep({"text": item["text"], **meta, "fetch": ref.digest})
            counts.documents += 1
            continue
        writer.count_in()
        messages = [
            {"role": "user", "content": item["question"]},
            {"role": "assistant", "content": item["answer"]},
        ]
        try:
            writer.keep(make_record(messages, None, meta))
            counts.records += 1
        except RecordError as error:
            writer.drop({"source": source.name, "url": item["url"]}, "unreadable", f"{item['url']}: {error}")
            counts.dropped["unreadable"] += 1
