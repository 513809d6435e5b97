"""Download one dataset file: resumable over HTTP, checked against its sha256, then unpacked.

HTTP(S) downloads go to a `.part` file; after a dropped connection, a timeout or a 5xx answer the
next try asks for the rest with a Range header (a server that ignores Range sends it all again),
waiting longer before each try. Other URLs (s3://, file://) are copied through fsspec. The
finished file is checked against the expected sha256 before anything reads it, then unpacked by
`tuneline.sources.unpack`.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from tuneline.sources.errors import SourceError, SourceUnreachable, source_os_error

USER_AGENT = "Tuneline/0.1 (dataset download)"
CHUNK = 1 << 20
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


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
        final = source_os_error(name, url, error)
        if not isinstance(final, SourceUnreachable):
            raise final from None  # a symlink loop or denied permission: no retry changes it
        raise RetryableDownloadError(f"{type(error).__name__}: {error}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
