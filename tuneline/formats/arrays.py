"""The elements of a JSON array file, streamed with ijson whatever the file's line layout.

A 95 MB array on one line used to be one "line too long" reject, and the same array one element
per line was read whole into memory. Here the file is fed to ijson's incremental parser (the yajl2
C backend when installed) a line, or a block of a long line, at a time, so memory holds one element
and each element keeps the line it starts on and its index in the array. Numbers come out as
floats (`use_float`), as `json.loads` gives them, never Decimal.

ijson's low-level events (no prefixes: building `item.item.item...` prefixes costs memory
quadratic in the nesting depth) are assembled here into values, which lets an element nested past
MAX_DEPTH be rejected alone and the next one read. Bytes that are not UTF-8 are replaced before
the parser sees them and the element that held them is rejected, so one bad byte costs one
element, not the rest of the array. A syntax error does stop the array: nothing after it can be
trusted to start an element.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import ijson
from ijson.common import ObjectBuilder

BLOCK_BYTES = 1 << 16  # a long line is fed in blocks of this size: 64 KiB of elements held at most
# Deeper than any real record, and shallow enough that json.dumps of the record cannot recurse out.
MAX_DEPTH = 500
# As for a JSON line: an element this long is not held in memory (the parser would buffer it).
MAX_ELEMENT_BYTES = 64 * 1024 * 1024
TOO_DEEP = "invalid JSON: nested too deeply to read"
READ_ERRORS = (OSError, EOFError)
REPLACEMENT = "\ufffd".encode()
DEPTH_CHANGE = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}


@dataclass(frozen=True)
class RawValue:
    """One JSON value of a file: the line it starts on, its index in an array (None in JSON lines),
    and the value or the reason it could not be read."""

    line: int
    value: Any = None
    reason: str | None = None
    element: int | None = None


class _ArrayParser:
    """Feeds a JSON array's bytes to ijson and collects its elements as RawValues."""

    def __init__(self, first_line: int) -> None:
        self.events = ijson.sendable_list()
        self.coro = ijson.basic_parse_coro(self.events, use_float=True)
        self.depth = 0
        self.builder: ObjectBuilder | None = None
        self.in_element = False
        self.element = -1
        self.start_line = first_line
        self.bad: str | None = None  # why the element being read will be rejected
        self.pending_bad: str | None = None  # a bad byte seen before its element's first event
        self.closed = False
        self.out: list[RawValue] = []
        self.fed = 0  # bytes sent to the parser
        self.block_start = 0  # self.fed before the block being parsed
        self.element_start = 0  # the block_start of the element being read

    def feed(self, data: bytes, line: int, column: int) -> None:
        """Parse one block that starts at byte `column` of `line`; invalid UTF-8 rejects its element."""
        while data:
            bad_at = _first_bad_utf8(data)
            if bad_at is None:
                self._send(data, line)
                return
            self._send(data[:bad_at], line)
            reason = f"invalid UTF-8 at byte {column + bad_at} of line {line} ({data[bad_at]:#04x})"
            if self.in_element:
                self.bad = self.bad or reason
            else:
                self.pending_bad = self.pending_bad or reason
            self._send(REPLACEMENT, line)
            data, column = data[bad_at + 1 :], column + bad_at + 1

    def close(self) -> None:
        """The end of the file: raises ijson's error when the array was not closed."""
        self.coro.close()
        self._take_events(self.start_line)

    def _send(self, data: bytes, line: int) -> None:
        if data:
            self.block_start = self.fed
            self.fed += len(data)
            self.coro.send(data)
            self._take_events(line)

    def _take_events(self, line: int) -> None:
        for event, value in self.events:
            self._event(event, value, line)
        del self.events[:]

    def _event(self, event: str, value: Any, line: int) -> None:
        if self.depth == 1 and not self.in_element:
            if event == "end_array":
                self.depth, self.closed = 0, True
                return
            self._start_element(line)
        self.depth += DEPTH_CHANGE.get(event, 0)
        if self.depth > MAX_DEPTH and self.builder is not None:
            self.builder, self.bad = None, self.bad or TOO_DEEP
        if self.builder is not None:
            self.builder.event(event, value)
        if self.in_element and self.depth == 1:
            self._end_element()

    def _start_element(self, line: int) -> None:
        self.element += 1
        self.in_element, self.start_line, self.element_start = True, line, self.block_start
        self.builder = ObjectBuilder()
        self.bad, self.pending_bad = self.pending_bad, None

    def _end_element(self) -> None:
        where = {"line": self.start_line, "element": self.element}
        if self.bad is not None:
            self.out.append(RawValue(**where, reason=self.bad))
        else:
            self.out.append(RawValue(**where, value=self.builder.value))
        self.in_element, self.builder, self.bad = False, None, None


def _first_bad_utf8(data: bytes) -> int | None:
    """The offset of the first byte that is not UTF-8, or None; a sequence cut at the block's end
    is not counted (the caller feeds whole lines, or carries a cut sequence to the next block)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data" and error.end == len(data):
            return None
        return error.start
    return None


def _cut_sequence(block: bytes) -> int:
    """How many bytes at the end of a block start a UTF-8 sequence the block cuts short."""
    for back in range(1, min(4, len(block)) + 1):
        byte = block[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the sequence starts here
            length = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return back if length > back else 0
    return 0


def iter_array(stream: BinaryIO, first: bytes, first_line: int) -> Iterator[RawValue]:
    """The elements of the JSON array whose first bytes (`first`, on `first_line`) were already read."""
    parser = _ArrayParser(first_line)
    line, column, block = first_line, 0, first
    try:
        while block:
            carry = 0 if block.endswith(b"\n") else _cut_sequence(block)
            parser.feed(block[: len(block) - carry], line, column)
            yield from _drain(parser)
            if parser.in_element and parser.fed - parser.element_start > MAX_ELEMENT_BYTES:
                yield _too_long(parser)
                return
            if block.endswith(b"\n"):
                line, column = line + 1, 0
            else:
                column += len(block) - carry
            try:
                block = block[len(block) - carry :] + stream.readline(BLOCK_BYTES)
            except READ_ERRORS as error:
                yield RawValue(line, reason=f"file unreadable from here on: {error}")
                return
            if carry and len(block) == carry:  # the file ends inside a sequence
                parser.feed(block, line, column)
                break
        parser.close()
        yield from _drain(parser)
    except ijson.JSONError as error:
        yield from _drain(parser)
        yield _syntax_error(parser, error, line)


def _too_long(parser: _ArrayParser) -> RawValue:
    """The reject that ends an array at an element too long to hold."""
    return RawValue(
        parser.start_line,
        reason=f"array element {parser.element} is longer than {MAX_ELEMENT_BYTES} bytes; not read, "
        "and the rest of the array cannot be read",
        element=parser.element,
    )


def _drain(parser: _ArrayParser) -> Iterator[RawValue]:
    yield from parser.out
    parser.out.clear()


def _syntax_error(parser: _ArrayParser, error: Exception, line: int) -> RawValue:
    """The reject that ends an array: where the parser stopped, and what it said, in words."""
    message = str(error).splitlines()[0].removeprefix("b'").removeprefix('b"').removeprefix("parse error: ")
    if parser.closed:
        return RawValue(line, reason="extra data after the closing `]` of the array")
    if "premature EOF" in message:
        return RawValue(
            parser.start_line, reason="the JSON array is not closed with `]`; the file looks truncated"
        )
    element = parser.element if parser.in_element else parser.element + 1
    return RawValue(
        line,
        reason=f"invalid JSON at line {line} (array element {element}): {message}; "
        "the rest of the array cannot be read",
        element=element,
    )
