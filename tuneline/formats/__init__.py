"""Dataset formats: read files of known formats into canonical records, and write them back out.

Five formats come in (alpaca, sharegpt in LLaMA-Factory's flavour, openai chat, prompt_completion
and self_instruct); all but self_instruct go out again. A sixth, `text`, holds documents rather than
conversations (`{"text": ...}` JSON lines such as LLaMA-Factory's c4_demo, or a plain `.txt`/`.md`
file): `iter_documents` reads it, `iter_file` refuses it. Reading never stops at a bad record: each
becomes an `Item` with the line and the reason, so callers quarantine it. Only a whole file that
cannot be read raises (`FormatError` for an unknown format, OSError for a missing file). Writing
says what the target format cannot hold (`to_format` losses) and which records it could not
represent at all, never dropping one silently. What each format looks like (one object <-> one
conversation) lives in `tuneline.formats.codecs`; import everything from here.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import fsspec

from tuneline.formats.arrays import BLOCK_BYTES, TOO_DEEP, RawValue, iter_array
from tuneline.formats.codecs import (
    WRITABLE_FORMATS,
    ConversionError,
    Format,
    json_type,
    parse_object,
    to_format,
)
from tuneline.formats.containers import (
    DEFAULT_LIMITS,
    FormatError,
    UnpackLimitError,
    UnpackLimits,
    open_content,
)
from tuneline.recipe.section import PLAIN_TEXT_SUFFIXES, bare_name, is_plain_text_path
from tuneline.records import Record, RecordError, make_record

__all__ = [
    "WRITABLE_FORMATS", "ConversionError", "Format", "FormatError", "Item", "ReadResult", "WriteResult",
    "UnpackLimitError", "UnpackLimits", "detect_format", "detect_keys", "is_plain_text_path",
    "iter_documents", "iter_file", "parse_object", "peek_format", "read_records", "to_format",
    "write_records", "write_stream",
]  # fmt: skip


FORMAT_KEYS = (
    "alpaca (instruction, input, output); sharegpt (conversations, tools); openai (messages); "
    "prompt_completion (prompt, completion); self_instruct (instruction, instances); "
    "text (text: documents)"
)
# A plain text file becomes one document, cut at the first blank line past this many characters so
# that a large file is never held whole (grounded rounds cut documents into chunks anyway).
DOCUMENT_CHARS = 1 << 20
BOM = b"\xef\xbb\xbf"
# A line this long is rejected unread rather than held in memory; 64 MiB is far beyond any
# sensible training example but small enough never to exhaust a worker.
MAX_LINE_BYTES = 64 * 1024 * 1024
READ_ERRORS = (OSError, EOFError, zlib.error)


def is_json_array_path(path: str) -> bool:
    """Whether a path names a JSON array file (`.json`, also gzipped) rather than JSON lines."""
    name = PurePosixPath(str(path)).name.lower().removesuffix(".gz")
    return name.endswith(".json")


def source_name(path: str) -> str:
    """A file's name without folders and dataset suffixes: the default source name of its records."""
    name = bare_name(path)
    for suffix in (".jsonl", ".json", *PLAIN_TEXT_SUFFIXES):
        name = name.removesuffix(suffix)
    return name


def iter_json_values(path: str, limits: UnpackLimits = DEFAULT_LIMITS) -> Iterator[RawValue]:
    """Every JSON value of a JSON-lines or JSON-array file, in order; bad ones as reasons.

    What the file is comes from its first bytes, not its name: gzip, bz2, xz and zstd are unpacked
    within `limits` (UnpackLimitError past them), archives raise FormatError.
    """
    with fsspec.open(path, "rb") as raw:
        yield from _iter_stream(open_content(raw, path, limits))


def _iter_stream(stream: BinaryIO) -> Iterator[RawValue]:
    """JSON lines, or a JSON array (streamed) when the first content starts with `[`."""
    line_no, at_line_start = 1, True
    while True:
        try:
            raw = stream.readline(BLOCK_BYTES)
        except READ_ERRORS as error:
            yield RawValue(line_no, reason=f"file unreadable from here on: {error}")
            return
        if not raw:
            return
        if line_no == 1 and at_line_start and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        stripped = raw.lstrip()
        if stripped.startswith(b"["):
            yield from iter_array(stream, raw, line_no)
            return
        if stripped:
            yield from _iter_lines(stream, raw, line_no)
            return
        at_line_start = raw.endswith(b"\n")
        line_no += at_line_start


def _iter_lines(stream: BinaryIO, first: bytes, first_line: int) -> Iterator[RawValue]:
    """JSON lines from the first content line on (`first` may be the first block of a long line)."""
    line_no, raw = first_line, first
    if not first.endswith(b"\n"):
        raw += _read_line(stream, MAX_LINE_BYTES + 1 - len(first))
    while raw:
        if len(raw) > MAX_LINE_BYTES:
            yield _too_long(stream, line_no, read_rest=not raw.endswith(b"\n"))
        elif raw.strip():
            yield _decode_line(raw, line_no)
        line_no += 1
        try:
            raw = stream.readline(MAX_LINE_BYTES + 1)
        except READ_ERRORS as error:
            yield RawValue(line_no, reason=f"file unreadable from here on: {error}")
            return


def _read_line(stream: BinaryIO, size: int) -> bytes:
    """The rest of a line, up to `size` bytes; b"" when the stream breaks (the next read says why)."""
    try:
        return stream.readline(max(size, 0))
    except READ_ERRORS:
        return b""


def _too_long(stream: BinaryIO, line_no: int, read_rest: bool) -> RawValue:
    """A line over MAX_LINE_BYTES becomes a reject; the rest of it is read past, never kept."""
    chunk = b""
    while read_rest and not chunk.endswith(b"\n"):
        try:
            chunk = stream.readline(MAX_LINE_BYTES)
        except READ_ERRORS:
            break
        if not chunk:
            break
    return RawValue(line_no, reason=f"line longer than {MAX_LINE_BYTES} bytes; not read")


def _decode_line(raw: bytes, line_no: int) -> RawValue:
    """One JSON-lines line as a value, or why not (bad UTF-8, bad JSON, truncated last line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RawValue(
            line_no, reason=f"invalid UTF-8 at byte {error.start} of the line ({raw[error.start]:#04x})"
        )
    try:
        return RawValue(line_no, json.loads(text))
    except json.JSONDecodeError as error:
        reason = f"invalid JSON: {error.msg} (column {error.colno})"
        if not raw.endswith(b"\n"):
            reason += "; the last line has no newline, so the file looks truncated"
        return RawValue(line_no, reason=reason)
    except RecursionError:
        return RawValue(line_no, reason=TOO_DEEP)


def write_json_values(values: Iterable[dict[str, Any]], stream: BinaryIO, json_array: bool) -> None:
    """Write objects as JSON lines, or as one indented JSON array (what LLaMA-Factory reads)."""
    if not json_array:
        for value in values:
            stream.write(json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n")
        return
    separator = b"[\n"
    for value in values:
        # JSON text never holds a raw newline inside a string, so indenting by replace is safe.
        element = "  " + json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n  ")
        stream.write(separator + element.encode("utf-8"))
        separator = b",\n"
    stream.write(b"[]\n" if separator == b"[\n" else b"\n]\n")


def detect_keys(obj: dict[str, Any]) -> Format | None:
    """The format an object's keys point to, or None when they match no known format."""
    if "conversations" in obj:
        return Format.SHAREGPT
    if "messages" in obj:
        first = obj["messages"][0] if isinstance(obj["messages"], list) and obj["messages"] else None
        return Format.SHAREGPT if isinstance(first, dict) and "from" in first else Format.OPENAI
    if "instruction" in obj:
        return Format.SELF_INSTRUCT if "instances" in obj else Format.ALPACA
    if "prompt" in obj:
        return Format.PROMPT_COMPLETION
    if "text" in obj:
        return Format.TEXT
    return None


@dataclass(frozen=True)
class Item:
    """One record read from a file with the line its object starts on, or why that object was rejected."""

    line: int
    record: Record | None = None
    reason: str | None = None
    document: dict[str, Any] | None = None  # from iter_documents: text, title and meta


@dataclass
class ReadResult:
    """A whole file read: its format (None when it held no object), records (or, for `text`,
    documents) and `file:line: reason`s."""

    path: str
    format: Format | None
    records: list[Record] = field(default_factory=list)
    rejects: list[str] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class WriteResult:
    """What a write did: records written, records per loss reason, and (where, reason) not converted."""

    written: int = 0
    losses: Counter[str] = field(default_factory=Counter)
    unconverted: list[tuple[str, str]] = field(default_factory=list)


def as_format(value: Format | str | None) -> Format | None:
    """A caller's format name as a Format; an unknown name raises FormatError listing the known ones."""
    if value is None or isinstance(value, Format):
        return value
    try:
        return Format(value)
    except ValueError:
        raise FormatError(f"unknown format {value!r}; use one of {', '.join(Format)}") from None


def detect_format(path: str | Path) -> Format:
    """The format of a file, from the keys of its first readable JSON object."""
    fmt = _detect(str(path))
    if fmt is None:
        raise FormatError(
            f"{path}: holds no readable JSON object, so its format cannot be detected; "
            f"check the file, or pass --format {'|'.join(Format)}"
        )
    return fmt


def peek_format(path: str | Path, limits: UnpackLimits = DEFAULT_LIMITS) -> Format | None:
    """A file's format: `text` for a plain text file, else from the keys of its first readable
    object; None when it holds no object at all. Unknown keys raise FormatError."""
    return _detect(str(path), limits)


def _detect(path: str, limits: UnpackLimits = DEFAULT_LIMITS) -> Format | None:
    """The format of the first readable object of a file; None when there is no object at all."""
    if is_plain_text_path(path):
        return Format.TEXT
    for raw in iter_json_values(path, limits):
        if raw.reason is None and isinstance(raw.value, dict):
            return _format_of(raw.value, path, raw.line)
    return None


def _format_of(obj: dict[str, Any], path: str, line: int) -> Format:
    """detect_keys, or a FormatError naming the file, the keys seen and the --format fix."""
    fmt = detect_keys(obj)
    if fmt is None:
        seen = ", ".join(sorted(obj)[:12]) or "no keys"
        raise FormatError(
            f"{path}:{line}: cannot tell the format from the keys [{seen}]; expected {FORMAT_KEYS}; "
            f"pass --format {'|'.join(Format)} if the file is one of these"
        )
    return fmt


def iter_file(
    path: str | Path,
    format: Format | str | None = None,
    source: str | None = None,
    limits: UnpackLimits = DEFAULT_LIMITS,
) -> Iterator[Item]:
    """Stream a file's records with their lines, and an Item with a reason for each unreadable one.

    An explicit format overrides detection; without one the first readable object's keys decide.
    `source` names the records' origin in meta (default: the file name without suffixes). A
    compressed file unpacks within `limits`. Rejects of JSON array elements name the element's
    index too, since one line may hold the whole array.
    """
    path = str(path)
    fmt = as_format(format) or (Format.TEXT if is_plain_text_path(path) else None)
    meta = {"source": source or source_name(path), "origin": "collected", "file": path}
    _refuse_documents(path, fmt)
    for found in _json_objects(path, limits):
        if isinstance(found, Item):
            yield found
            continue
        obj, line, where = found
        fmt = fmt or _format_of(obj, path, line)
        _refuse_documents(path, fmt)
        for item in _read_object(obj, fmt, {**meta, "line": line}):
            yield item if item.record is not None else Item(item.line, reason=item.reason + where)


def _json_objects(path: str, limits: UnpackLimits) -> Iterator[Item | tuple[dict[str, Any], int, str]]:
    """Each JSON object of a file as (object, line, where in an array it sits), and a rejecting
    Item for a value that cannot be read or is not an object."""
    for raw in iter_json_values(path, limits):
        where = "" if raw.element is None else f" (array element {raw.element})"
        if raw.reason is not None:
            yield Item(raw.line, reason=raw.reason if "array element" in raw.reason else raw.reason + where)
        elif not isinstance(raw.value, dict):
            yield Item(raw.line, reason=f"expected a JSON object, got {json_type(raw.value)}{where}")
        else:
            yield raw.value, raw.line, where


def _refuse_documents(path: str, fmt: Format | None) -> None:
    """A FormatError when a file holds documents where conversation records are needed."""
    if fmt == Format.TEXT:
        raise FormatError(
            f"{path}: holds documents (format text), not conversation records; use it as a recipe source "
            "(its documents go to the collect stage, for grounded augmentation and pre-training) "
            "or pass --format if it is a dataset of another format"
        )


def _read_object(obj: dict[str, Any], fmt: Format, meta: dict[str, Any]) -> Iterator[Item]:
    """The records of one object, or one rejecting Item when any part of it is unusable."""
    try:
        conversations = parse_object(obj, fmt)
        records = [make_record(c.messages, c.tools, {**meta, **c.hint}) for c in conversations]
    except RecordError as error:
        yield Item(meta["line"], reason=str(error))
        return
    for record in records:
        yield Item(meta["line"], record)


def read_records(
    path: str | Path,
    format: Format | str | None = None,
    source: str | None = None,
    limits: UnpackLimits = DEFAULT_LIMITS,
) -> ReadResult:
    """Read a whole file: its format, records and rejects as `file:line: reason`."""
    fmt = as_format(format) or _detect(str(path), limits)
    result = ReadResult(str(path), fmt)
    items = iter_documents if fmt == Format.TEXT else iter_file
    for item in items(path, fmt, source, limits):
        if item.record is not None:
            result.records.append(item.record)
        elif item.document is not None:
            result.documents.append(item.document)
        else:
            result.rejects.append(f"{path}:{item.line}: {item.reason}")
    return result


def iter_documents(
    path: str | Path,
    format: Format | str | None = None,
    source: str | None = None,
    limits: UnpackLimits = DEFAULT_LIMITS,
) -> Iterator[Item]:
    """Stream a document source: each `{"text": ...}` object (JSON lines or array) is one document,
    a plain `.txt`/`.md` file is one (cut at a blank line past DOCUMENT_CHARS). Documents carry
    `text`, `title` (the object's, else the file name) and the meta records get; an unusable
    object or line is an Item with a reason.
    """
    path = str(path)
    meta = {"source": source or source_name(path), "origin": "collected", "file": path}
    if is_plain_text_path(path) and as_format(format) in (None, Format.TEXT):
        with fsspec.open(path, "rb") as raw:
            yield from _plain_documents(open_content(raw, path, limits), PurePosixPath(path).name, meta)
        return
    for found in _json_objects(path, limits):
        if isinstance(found, Item):
            yield found
        else:
            obj, line, where = found
            yield _document_item(obj, line, {**meta, "line": line}, where)


def _document_item(obj: dict[str, Any], line: int, meta: dict[str, Any], where: str) -> Item:
    """One `{"text": ...}` object as a document (its title kept), or why it is none."""
    text = obj.get("text")
    if not isinstance(text, str):
        got = "missing" if "text" not in obj else f"expected text, got {json_type(text)}"
        return Item(line, reason=f"text: {got}{where}")
    if not text.strip():
        return Item(line, reason=f"text: empty, so there is no document{where}")
    title = obj.get("title") if isinstance(obj.get("title"), str) else None
    return Item(line, document={"text": text, "title": title, **meta})


def _plain_documents(stream: BinaryIO, title: str, meta: dict[str, Any]) -> Iterator[Item]:
    """A plain text file as documents of about DOCUMENT_CHARS at most, cut at blank lines; a line
    that is not UTF-8 (or too long to hold) is left out with a reason."""
    lines: list[str] = []
    size, start = 0, 1
    for line_no, raw in enumerate(_raw_lines(stream), 1):
        if isinstance(raw, RawValue):
            yield Item(line_no, reason=raw.reason)
            continue
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff") if line_no == 1 else raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield Item(line_no, reason=f"invalid UTF-8 at byte {error.start} of the line; line left out")
            continue
        if not lines:
            start = line_no
        lines.append(text)
        size += len(text)
        if size >= DOCUMENT_CHARS and not text.strip():
            yield from _plain_document(lines, start, title, meta)
            lines, size = [], 0
    yield from _plain_document(lines, start, title, meta)


def _plain_document(lines: list[str], start: int, title: str, meta: dict[str, Any]) -> Iterator[Item]:
    text = "".join(lines).strip()
    if text:
        yield Item(start, document={"text": text, "title": title, **meta, "line": start})


def _raw_lines(stream: BinaryIO) -> Iterator[bytes | RawValue]:
    """The lines of a stream as bytes; one over MAX_LINE_BYTES or a broken stream as a RawValue."""
    while True:
        try:
            raw = stream.readline(MAX_LINE_BYTES + 1)
        except READ_ERRORS as error:
            yield RawValue(0, reason=f"file unreadable from here on: {error}")
            return
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            yield _too_long(stream, 0, read_rest=not raw.endswith(b"\n"))
        else:
            yield raw


def writable_format(value: Format | str) -> Format:
    """A format that has a writer; self_instruct and unknown names raise FormatError with the choices."""
    fmt = as_format(value)
    if fmt not in WRITABLE_FORMATS:
        raise FormatError(f"cannot write {value!r}: Tuneline writes {', '.join(WRITABLE_FORMATS)}")
    return fmt


def record_location(record: Record) -> str:
    """Where a record came from as `file:line` (from its meta), else its id."""
    meta = record.get("meta") or {}
    return f"{meta['file']}:{meta.get('line', '?')}" if "file" in meta else f"record {record.get('id')}"


def write_stream(
    records: Iterable[Record], stream: BinaryIO, format: Format | str, json_array: bool
) -> WriteResult:
    """Convert records to `format` and write them to a binary stream as JSON lines or a JSON array."""
    target = writable_format(format)
    result = WriteResult()
    write_json_values(_convert_all(records, target, result), stream, json_array)
    return result


def _convert_all(records: Iterable[Record], target: Format, result: WriteResult) -> Iterator[dict[str, Any]]:
    """The converted objects, counting losses and noting unconverted records in `result`."""
    for record in records:
        try:
            obj, losses = to_format(record, target)
        except ConversionError as error:
            result.unconverted.append((record_location(record), str(error)))
            continue
        result.losses.update(set(losses))
        result.written += 1
        yield obj


def write_records(records: Iterable[Record], path: str | Path, format: Format | str) -> WriteResult:
    """Write records to a file in `format`: `.json` (also `.json.gz`) as a JSON array, else JSON lines."""
    target = writable_format(format)
    with fsspec.open(str(path), "wb", compression="infer") as stream:
        return write_stream(records, stream, target, is_json_array_path(str(path)))
