"""Download one dataset file: resumable over HTTP, checked against its sha256, then unpacked.

HTTP(S) downloads go to a `.part` file; after a dropped connection, a timeout or a 5xx answer the
next try asks for the rest with a Range header (a server that ignores Range sends it all again),
waiting longer before each try. Other URLs (s3://, file://) are copied through fsspec. The
finished file is checked against the expected sha256 before anything reads it; `.gz` files and
`.zip` archives are unpacked into their dataset files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec

from tuneline.sources.errors import SourceError, SourceUnreachable

USER_AGENT = "Tuneline/0.1 (dataset download)"
CHUNK = 1 << 20
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
DATA_SUFFIXES = (".jsonl", ".json")


class RetryableDownloadError(Exception):
    """One failed try that another may fix."""


@dataclass
class Downloaded:
    """A finished download: its file, sha256, size and how many tries it took."""

    path: Path
    sha256: str
    size: int
    tries: int
    errors: list[str] = field(default_factory=list)


def download(
    url: str, part_path: Path, *, name: str, sha256: str | None = None,
    retries: int = 4, timeout_s: float = 30.0, backoff_s: float = 0.5,
) -> Downloaded:  # fmt: skip
    """Download url into part_path (resuming what is there) and check it; the source `name` is
    in every error. Raises SourceUnreachable when every try failed, SourceError for a checksum
    mismatch or an answer no retry can change (404, 403...)."""
    part_path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    is_http = url.startswith(("http://", "https://"))
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            if is_http:
                _http_try(url, part_path, timeout_s, name)
            else:
                _fsspec_copy(url, part_path, name)
            break
        except RetryableDownloadError as error:
            errors.append(str(error))
    else:
        raise SourceUnreachable(
            f"source {name!r}: {url}: download failed after {retries + 1} "
            f"{'try' if retries == 0 else 'tries'}; last error: {errors[-1]}"
        )
    digest = file_sha256(part_path)
    if sha256 and digest != sha256.lower():
        part_path.unlink()
        raise SourceError(
            f"source {name!r}: {url}: sha256 mismatch: expected {sha256.lower()}, got {digest}; "
            "the file is corrupted or changed upstream: check it, then fix sources[].sha256"
        )
    return Downloaded(part_path, digest, part_path.stat().st_size, len(errors) + 1, errors)


def _http_try(url: str, part_path: Path, timeout_s: float, name: str) -> None:
    """One HTTP try: ask for the bytes after what the .part file holds and append them."""
    have = part_path.stat().st_size if part_path.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status != 206:  # a full answer: start the file again
                have = 0
            expected = response.headers.get("Content-Length")
            written = 0
            with open(part_path, "ab" if have else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    written += len(block)
            if expected is not None and written < int(expected):
                raise RetryableDownloadError(
                    f"connection closed after {have + written} bytes of {have + int(expected)}"
                )
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left after what we hold: the file is complete
            return
        if error.code in RETRY_STATUS or error.code >= 500:
            raise RetryableDownloadError(f"HTTP {error.code} {error.reason}") from None
        raise SourceError(
            f"source {name!r}: {url} answered HTTP {error.code} {error.reason}; check the URL "
            "and the credentials it needs"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise RetryableDownloadError(f"{type(error).__name__}: {error}") from None


def _fsspec_copy(url: str, part_path: Path, name: str) -> None:
    """Copy a non-HTTP URL (s3://, file://, ...) whole; fsspec's own retries apply."""
    try:
        with fsspec.open(url, "rb") as source, open(part_path, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    except FileNotFoundError:
        raise SourceError(f"source {name!r}: {url} does not exist; fix sources[].url") from None
    except (OSError, TimeoutError) as error:
        raise RetryableDownloadError(f"{type(error).__name__}: {error}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack(path: Path, file_name: str, out_dir: Path) -> tuple[list[Path], list[str]]:
    """The dataset files of a download in out_dir: a .gz is decompressed, a .zip's JSON and JSONL
    members are extracted (numbered, so two members with one name both stay). Returns the files
    and the archive members skipped (not datasets)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] == b"\x1f\x8b":
        target = out_dir / (file_name.removesuffix(".gz") or "data")
        with gzip.open(path, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        return [target], []
    if magic == b"PK\x03\x04":
        files, skipped = [], []
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                base = PurePosixPath(member.filename).name  # never a path outside out_dir
                if member.is_dir():
                    continue
                if not base.lower().endswith(DATA_SUFFIXES):
                    skipped.append(member.filename)
                    continue
                target = out_dir / f"{len(files):03d}-{base}"
                with archive.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                files.append(target)
        return files, skipped
    target = out_dir / file_name
    shutil.copyfile(path, target)
    return [target], []
