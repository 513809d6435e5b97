"""The collect stage: read every source of the recipe into one set of canonical records.

Sources are files at local paths or fsspec URLs (file://, https://, s3://...). The stage is
keyed on each source's content fingerprint, not on its path, so an edited file is collected
again and an unchanged one is not. A record that cannot be read goes to rejects with
`file:line: reason`; a source that cannot be reached fails the stage naming the source.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec

from tuneline.errors import UserError
from tuneline.formats import FormatError, iter_file
from tuneline.recipe import FileSource
from tuneline.store import StageRef, code_digest, find_stage, stage_digest, write_stage


class SourceError(UserError, RuntimeError):
    """A source that cannot be read at all: missing file, unreachable URL, unknown format."""


class SourceUnreachable(SourceError):
    """A network failure worth retrying (timeouts, connection errors, 5xx)."""


def source_fingerprint(source: FileSource) -> dict[str, Any]:
    """What identifies a source's content: a sha256 for local files, size and ETag/mtime for URLs."""
    try:
        fs, path = fsspec.core.url_to_fs(source.path)
        info = fs.info(path)
    except FileNotFoundError as error:
        # fsspec's HTTP filesystem reports every failure as FileNotFoundError; its cause tells
        # a missing file (404, or none) from a server that is down or failing (worth a retry).
        cause = error.__cause__
        status = getattr(cause, "status", None)
        if status is not None and 400 <= status < 500 and status not in (404, 408, 410, 429):
            raise SourceError(
                f"source {source.name!r}: {source.path} answered HTTP {status}; check the URL "
                "and the credentials it needs"
            ) from None
        if cause is not None and not isinstance(cause, FileNotFoundError) and status not in (404, 410):
            raise SourceUnreachable(
                f"source {source.name!r}: cannot reach {source.path}: {type(cause).__name__}: {cause}"
            ) from error
        raise SourceError(
            f"source {source.name!r}: {source.path} does not exist; fix sources[].path "
            "(relative paths are relative to the project folder)"
        ) from None
    except (OSError, TimeoutError) as error:
        raise SourceUnreachable(f"source {source.name!r}: cannot reach {source.path}: {error}") from error
    if info.get("type") == "directory":
        raise SourceError(f"source {source.name!r}: {source.path} is a folder; name a file")
    if "file" in fs.protocol or "local" in fs.protocol:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest()}
    keys = ("size", "ETag", "etag", "mtime", "LastModified", "last_modified")
    return {key: str(info[key]) for key in keys if key in info} or {"path": source.path}


def run_collect(artifacts_dir: str | Path, sources: list[FileSource]) -> StageRef:
    """Read all sources into records.jsonl, unreadable records into rejects with file:line."""
    fingerprints = [source_fingerprint(source) for source in sources]
    digest = stage_digest("collect", sources, fingerprints, code_digest(__file__))
    if cached := find_stage(artifacts_dir, "collect", digest):
        return cached
    fetched_at = datetime.now(UTC).isoformat(timespec="seconds")
    per_source: dict[str, dict[str, int]] = {}
    with write_stage(artifacts_dir, "collect", digest) as writer:
        for source in sources:
            counts = per_source[source.name] = {"records": 0, "rejected": 0}
            try:
                for item in iter_file(source.path, source.format, source.name):
                    writer.count_in()
                    if item.record is None:
                        writer.drop(
                            {"source": source.name, "line": item.line},
                            "unreadable",
                            f"{source.path}:{item.line}: {item.reason}",
                        )
                        counts["rejected"] += 1
                    else:
                        item.record["meta"]["fetched_at"] = fetched_at
                        writer.keep(item.record)
                        counts["records"] += 1
            except FormatError as error:
                raise SourceError(f"source {source.name!r}: {error}") from None
            except (OSError, TimeoutError) as error:
                raise SourceUnreachable(
                    f"source {source.name!r}: reading {source.path} failed: {error}"
                ) from error
        writer.stats = {"sources": per_source}
    return find_stage(artifacts_dir, "collect", digest)
