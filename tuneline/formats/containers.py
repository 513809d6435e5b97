"""What a file really is, told by its first bytes, and decompression with a bound on what comes out.

A file's name can lie: a zip named `.json` read as text gave 28 of 30 "records". `sniff` reads
the magic bytes instead (gzip, bz2, xz, zstd; zip, tar, 7z, rar). `open_decompressed` streams a
compressed file through fsspec's codec for it and stops as soon as the output passes
`max_unpacked_bytes` or `max_ratio` times the compressed bytes read so far (codecs read ahead in
64 KiB steps), so a 47 MB gzip of 10 GiB of zeros fails after a few MiB instead of filling the disk.

Why the defaults: instruction-tuning data compresses 3-25x (the LLaMA-Factory demo sets 3-7x,
the project's templated support tickets 17x with gzip, 23x with bz2), while a deflate bomb runs at
about 1,000x and bz2 bombs far higher, so `max_ratio` 100 leaves 4x headroom over the most
repetitive real data seen. The ratio is judged only past 1 MiB of output, so small files never trip
it. 8 GiB of output is several times the largest public instruction sets; a bigger corpus raises
`max_unpacked_bytes` on its source.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from fsspec.compression import compr

from tuneline.errors import UserError
from tuneline.recipe import MAX_RATIO, MAX_UNPACKED_BYTES

RATIO_GRACE_BYTES = 1024**2  # below this much output the ratio is not judged: small files vary
PIECE_BYTES = 1 << 16  # unpacked bytes asked of a codec at once
HEAD_BYTES = 512  # enough for every magic below, tar's `ustar` at offset 257 included

COMPRESSED = ("gzip", "bz2", "xz", "zstd")
ARCHIVES = ("zip", "tar", "7z", "rar")
MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
)


class FormatError(UserError, ValueError):
    """A whole file (or a request) in a format Tuneline cannot handle; the message says the fix."""


class UnpackLimitError(FormatError):
    """A compressed file or archive member that unpacks past a limit; nothing of it is kept."""


@dataclass(frozen=True)
class UnpackLimits:
    """How much one compressed file may unpack to: bytes in all, and times its compressed size."""

    max_bytes: int = MAX_UNPACKED_BYTES  # the recipe's defaults, for files read outside a recipe
    max_ratio: float = MAX_RATIO


DEFAULT_LIMITS = UnpackLimits()


def sniff(head: bytes) -> str | None:
    """The container kind its first bytes say a file is (see MAGIC, and tar), or None for plain data."""
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    return None


def human_bytes(count: float) -> str:
    """A byte count for people: `1.0 MiB`, `8.0 GiB`."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class Budget:
    """Counts what one compressed input unpacks to and raises UnpackLimitError past a limit."""

    def __init__(self, what: str, limits: UnpackLimits) -> None:
        self.what = what
        self.limits = limits
        self.unpacked = 0

    def add(self, count: int, compressed: int) -> None:
        """Count `count` more output bytes, `compressed` input bytes having been read so far."""
        self.unpacked += count
        limits = self.limits
        if self.unpacked > limits.max_bytes:
            raise UnpackLimitError(
                f"{self.what}: unpacks to more than {human_bytes(limits.max_bytes)} "
                f"(max_unpacked_bytes: {limits.max_bytes}); nothing of it is kept. If the data is "
                "really this big, raise `max_unpacked_bytes` on its source in the recipe"
            )
        ratio_limit = limits.max_ratio * max(compressed, 1)
        if self.unpacked > RATIO_GRACE_BYTES and self.unpacked > ratio_limit:
            raise UnpackLimitError(
                f"{self.what}: unpacks to more than {limits.max_ratio:g} times its compressed size "
                f"({human_bytes(self.unpacked)} from {human_bytes(compressed)}; max_ratio: "
                f"{limits.max_ratio:g}), so it looks like a decompression bomb; nothing of it is kept. "
                "If you trust the file, raise `max_ratio` on its source in the recipe"
            )


class CountingReader(io.RawIOBase):
    """A read-only stream that counts the bytes read through it (the compressed side)."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


class BoundedReader(io.RawIOBase):
    """The unpacked side of a stream, charged to a Budget as it is read."""

    def __init__(self, inner: BinaryIO, budget: Budget, compressed: CountingReader | None = None,
                 compressed_size: int = 0) -> None:  # fmt: skip
        self.inner = inner
        self.budget = budget
        self.compressed = compressed
        self.compressed_size = compressed_size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # read1: what one step of the codec gives, so one that fails (a truncated file) loses only
        # the step it was taking.
        data = self.inner.read1(min(len(buffer), PIECE_BYTES))
        buffer[: len(data)] = data
        read_in = self.compressed.count if self.compressed is not None else self.compressed_size
        self.budget.add(len(data), read_in)
        return len(data)


def open_decompressed(raw: BinaryIO, kind: str, budget: Budget) -> io.BufferedReader:
    """A buffered stream of what a `kind` (one of COMPRESSED) file unpacks to, charged to `budget`."""
    if kind not in compr:
        raise FormatError(
            f"{budget.what}: is {kind}-compressed and this Python cannot read {kind}; "
            f"decompress it first, or install the {kind} codec fsspec uses"
        )
    counted = CountingReader(raw)
    codec = {"gzip": "gzip", "bz2": "bz2", "xz": "xz", "zstd": "zstd"}[kind]
    unpacked = compr[codec](io.BufferedReader(counted, 1 << 16), mode="rb")
    return io.BufferedReader(BoundedReader(unpacked, budget, counted), 1 << 20)


def buffered(raw: BinaryIO) -> io.BufferedReader:
    """Any readable binary stream as a BufferedReader (peek, readline with a size)."""
    return io.BufferedReader(CountingReader(raw), 1 << 20)


def read_head(stream: io.BufferedReader) -> bytes:
    """The first HEAD_BYTES of a buffered stream, without consuming them; b"" when the stream
    breaks at once (reading it again raises the error where the caller reports it)."""
    try:
        return stream.peek(HEAD_BYTES)[:HEAD_BYTES]
    except (OSError, EOFError, zlib.error):
        return b""


def not_dataset(what: str, kind: str) -> FormatError:
    """The error for an archive where a dataset file was expected: what it is, and the fix."""
    return FormatError(
        f"{what}: is a {kind} archive, not JSON or JSON lines, whatever its name says; unpack it and "
        "point the source at the dataset file inside, or fetch it with a `kind: url` source "
        "(which unpacks zip and tar archives)"
    )


def open_content(raw: BinaryIO, what: str, limits: UnpackLimits) -> io.BufferedReader:
    """The data of a file as its content says: gzip, bz2, xz and zstd are unpacked within `limits`;
    archives raise FormatError naming what the file really is."""
    stream = buffered(raw)
    kind = sniff(read_head(stream))
    if kind in ARCHIVES:
        raise not_dataset(what, kind)
    if kind is None:
        return stream
    unpacked = open_decompressed(stream, kind, Budget(what, limits))
    inner = sniff(read_head(unpacked))
    if inner is not None:
        raise FormatError(
            f"{what}: is a {inner} {'archive' if inner in ARCHIVES else 'file'} inside {kind}, not "
            "JSON or JSON lines; unpack it and point the source at the dataset file inside"
        )
    return unpacked
