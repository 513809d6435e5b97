"""Unpack a downloaded file into its dataset files, within the source's unpack limits.

What the file is comes from its first bytes (tuneline.formats.containers), not its name: gzip,
bz2, xz and zstd are decompressed; zip and tar archives (also compressed tars) give their JSON
and JSON-lines members; 7z and rar are refused. Every byte written is charged to a Budget, so a
decompression bomb stops at `max_unpacked_bytes` or `max_ratio`: a zip is checked against the
sizes its directory declares before anything is written, and again on the bytes actually
streamed, since a directory can lie. A failure raises FormatError (UnpackLimitError past a
limit); the caller's stage folder, and all it held, is then removed.
"""

from __future__ import annotations

import lzma
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tuneline.formats.containers import (
    COMPRESSED,
    RATIO_GRACE_BYTES,
    BoundedReader,
    Budget,
    CountingReader,
    FormatError,
    UnpackLimitError,
    UnpackLimits,
    buffered,
    human_bytes,
    not_dataset,
    open_decompressed,
    read_head,
    sniff,
)

CHUNK = 1 << 20
DATA_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")


def unpack(
    path: Path, file_name: str, out_dir: Path, limits: UnpackLimits, what: str
) -> tuple[list[Path], list[str]]:
    """The dataset files of a download (`what` names it in errors) in out_dir, and the archive
    members skipped as not datasets. A file its codec cannot read raises FormatError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _unpack(path, file_name, out_dir, limits, what)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # our own disk (full, read-only): not the file's fault
        raise FormatError(f"{what}: cannot be unpacked ({error}); the file is broken or truncated") from None


def _unpack(
    path: Path, file_name: str, out_dir: Path, limits: UnpackLimits, what: str
) -> tuple[list[Path], list[str]]:
    with open(path, "rb") as handle:
        stream = buffered(handle)
        read_so_far = stream.raw  # counts the download's bytes read: what tar members are charged against
        kind = sniff(read_head(stream))
        if kind == "zip":
            return _unpack_zip(path, out_dir, limits, what)
        if kind in ("7z", "rar"):
            raise not_dataset(what, kind)
        if kind in COMPRESSED:
            stream = open_decompressed(stream, kind, Budget(what, limits))
            inner = sniff(read_head(stream))
            if inner is not None and inner != "tar":
                raise FormatError(f"{what}: is a {inner} file inside {kind}; unpack it yourself first")
            kind = inner
        if kind == "tar":
            return _unpack_tar(stream, read_so_far, out_dir, limits, what)
        target = out_dir / (_strip_compression(file_name) or "data")
        _copy(stream, target)
        return [target], []


def _strip_compression(file_name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if file_name.lower().endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _copy(source: BinaryIO, target: Path) -> None:
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)


def _member_target(out_dir: Path, index: int, name: str) -> Path:
    """Where a member goes: numbered, by its base name only (never a path outside out_dir)."""
    return out_dir / f"{index:03d}-{PurePosixPath(name).name}"


def _is_data(name: str) -> bool:
    return PurePosixPath(name).name.lower().endswith(DATA_SUFFIXES)


def _unpack_zip(path: Path, out_dir: Path, limits: UnpackLimits, what: str) -> tuple[list[Path], list[str]]:
    """A zip's JSON and JSON-lines members, checked on declared sizes first, then as streamed."""
    files: list[Path] = []
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        data = [m for m in members if _is_data(m.filename)]
        _check_declared(data, limits, what)
        budget = Budget(what, limits)
        compressed = 0
        for member in data:
            compressed += member.compress_size
            target = _member_target(out_dir, len(files), member.filename)
            with archive.open(member) as source:
                _copy(BoundedReader(source, budget, compressed_size=compressed), target)
            files.append(target)
    return files, [m.filename for m in members if not _is_data(m.filename)]


def _check_declared(members: list[zipfile.ZipInfo], limits: UnpackLimits, what: str) -> None:
    """Refuse a zip whose directory already says it unpacks past the limits."""
    declared = sum(m.file_size for m in members)
    packed = sum(m.compress_size for m in members)
    if declared > limits.max_bytes:
        raise UnpackLimitError(
            f"{what}: its members declare {human_bytes(declared)}, more than max_unpacked_bytes "
            f"({limits.max_bytes}); nothing of it is kept. If the data is really this big, raise "
            "`max_unpacked_bytes` on its source in the recipe"
        )
    if declared > RATIO_GRACE_BYTES and declared > limits.max_ratio * max(packed, 1):
        raise UnpackLimitError(
            f"{what}: its members declare {human_bytes(declared)} from {human_bytes(packed)} compressed, "
            f"more than max_ratio ({limits.max_ratio:g}) times, so it looks like a decompression bomb; "
            "nothing of it is kept. If you trust the file, raise `max_ratio` on its source in the recipe"
        )


def _unpack_tar(
    stream: BinaryIO, read_so_far: CountingReader, out_dir: Path, limits: UnpackLimits, what: str
) -> tuple[list[Path], list[str]]:
    """A tar's regular JSON and JSON-lines members (links and devices skipped), streamed in order
    and charged against the bytes of the download read so far."""
    files: list[Path] = []
    skipped: list[str] = []
    budget = Budget(what, limits)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if member.isdir():
                continue
            if not (member.isfile() and _is_data(member.name)):
                skipped.append(member.name)
                continue
            target = _member_target(out_dir, len(files), member.name)
            source = archive.extractfile(member)
            _copy(BoundedReader(source, budget, read_so_far), target)
            files.append(target)
    return files, skipped
