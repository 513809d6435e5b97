"""The fetch stage: each source's raw data in a cached stage folder of its own.

One fetch per source, keyed on the source's recipe section and a fingerprint of its content, so
an unchanged source is never fetched twice and a failing one is retried alone:

- file: nothing is copied; the stage records the file's fingerprint (collect reads the file);
- url: the downloaded, checked and unpacked dataset files (`data/`), keyed on the validators the
  server answers a HEAD with (ETag, Last-Modified, Content-MD5, Digest; size alone proves nothing);
- hf: the split loaded through `datasets.load_dataset`, columns renamed, as `rows.jsonl`, with
  the revision it came from (the hub's commit sha, or a local folder's or file's content digest);
- crawl: the spider's kept items (`items.jsonl`, raw HTML included) and its drops in
  `rejects.jsonl` with their reasons; the crawl's stats in `stats.json`.

A refresh (the `refresh` flow passes a `refresh` token, its run's id) looks again where a plain
run trusts what it has: a URL whose server gives no validator is downloaded again and its
content hash decides, and a crawl crawls again (its key holds the token). A plain `tuneline run`
passes none and reuses a finished crawl as before.

A fetch that fails leaves no stage folder. Partial downloads wait under `downloads/` so a
retry resumes them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import fsspec

from tuneline.formats.containers import FormatError, UnpackLimits
from tuneline.pipeline import FETCH
from tuneline.recipe import CrawlSource, FileSource, HfSource, Source, UrlSource
from tuneline.sources.crawl import DROPS, ITEMS, crawl_summary, run_crawl
from tuneline.sources.download import Downloaded, download
from tuneline.sources.errors import SourceError, SourceUnreachable, source_os_error
from tuneline.sources.unpack import unpack
from tuneline.store import (
    StageRef,
    StageWriter,
    cached_sha256,
    find_stage,
    folder_key,
    iter_jsonl,
    reuse_or_write,
    stage_key,
    stage_lock,
)

ROWS = "rows.jsonl"
DATA_DIR = "data"
# What proves a file unchanged without reading it: a content hash, or a validator a server gives.
VALIDATORS = (
    *("sha256", "ETag", "etag", "Content-MD5", "Digest", "Last-Modified"),
    *("LastModified", "last_modified"),  # object stores' names (s3fs, gcsfs) for Last-Modified
)
HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_fetch(artifacts_dir: str | Path, source: Source, refresh: str | None = None) -> StageRef:
    """Fetch one source into its own stage folder, or return the finished one; `refresh` (a token
    only the refresh flow passes) re-crawls and re-downloads what no validator vouches for."""
    match source:
        case FileSource():
            return fetch_file(artifacts_dir, source)
        case UrlSource():
            return fetch_url(artifacts_dir, source, refresh)
        case HfSource():
            return fetch_hf(artifacts_dir, source)
        case CrawlSource():
            return fetch_crawl(artifacts_dir, source, refresh)
    raise TypeError(f"unknown source {source!r}")


def path_fingerprint(name: str, path: str) -> dict[str, Any]:
    """What identifies a file's content: a sha256 for local files; for URLs the size and every
    validator the server gives (ETag, Last-Modified, Content-MD5, Digest; mtime on object stores)."""
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        info = fs.info(fs_path)
    except FileNotFoundError as error:
        # fsspec's HTTP filesystem reports every failure as FileNotFoundError; its cause tells
        # a missing file (404, or none) from a server that is down or failing (worth a retry).
        cause = error.__cause__
        status = getattr(cause, "status", None)
        if status is not None and 400 <= status < 500 and status not in (404, 408, 410, 429):
            raise SourceError(
                f"source {name!r}: {path} answered HTTP {status}; check the URL and the credentials it needs"
            ) from None
        if cause is not None and not isinstance(cause, FileNotFoundError) and status not in (404, 410):
            raise SourceUnreachable(
                f"source {name!r}: cannot reach {path}: {type(cause).__name__}: {cause}"
            ) from error
        raise SourceError(
            f"source {name!r}: {path} does not exist; fix the source's path or url "
            "(relative paths are relative to the project folder)"
        ) from None
    except (OSError, TimeoutError) as error:
        raise source_os_error(name, path, error) from error
    if info.get("type") == "directory":
        raise SourceError(f"source {name!r}: {path} is a folder; name a file")
    if "file" in fs.protocol or "local" in fs.protocol:
        return {"sha256": local_sha256(name, path, fs, fs_path, info)}
    keys = ("size", "mtime", *VALIDATORS)
    return {key: str(info[key]) for key in keys if key in info} or {"path": path}


def local_sha256(name: str, path: str, fs: Any, fs_path: str, info: dict[str, Any]) -> str:
    """The sha256 of a local regular file; a pipe or device (which may never end) is refused."""
    if info.get("type") != "file":
        raise SourceError(
            f"source {name!r}: {path} is not a regular file (a pipe, socket or device); name a file"
        )
    digest = hashlib.sha256()
    try:
        with fs.open(fs_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise source_os_error(name, path, error) from error
    return digest.hexdigest()


def fetch_file(artifacts_dir: str | Path, source: FileSource) -> StageRef:
    """A file source: only its fingerprint, so that collect re-runs when the file changes."""
    fingerprint = path_fingerprint(source.name, source.path)

    def write(writer: StageWriter) -> None:
        writer.stats = {"source": source.name, "kind": source.kind, "fingerprint": fingerprint}

    return reuse_or_write(artifacts_dir, FETCH, stage_key(FETCH, source, fingerprint), write)


def has_validator(fingerprint: dict[str, Any]) -> bool:
    """Whether a fingerprint proves content: a hash or a server's validator, not a size alone."""
    return any(key in fingerprint for key in VALIDATORS)


def fetch_url(artifacts_dir: str | Path, source: UrlSource, refresh: str | None = None) -> StageRef:
    """Download a dataset file (resuming a partial one), check it, unpack it; a file whose
    validators are unchanged is not downloaded again. On a refresh, a file without validators is."""
    fingerprint = {"sha256": source.sha256} if source.sha256 else path_fingerprint(source.name, source.url)
    if refresh is not None and not has_validator(fingerprint):
        return refetch_url(artifacts_dir, source, refresh)
    digest = stage_key(FETCH, source, fingerprint)
    if cached := find_stage(artifacts_dir, FETCH.name, digest):
        return cached  # checked before downloading: a finished stage never downloads again
    # Under the stage's lock from the download on: two runs never append to one partial file.
    with stage_lock(artifacts_dir, FETCH.name, digest):
        if cached := find_stage(artifacts_dir, FETCH.name, digest):  # fetched while this run waited
            return cached
        return _download_and_unpack(artifacts_dir, source, digest)


def refetch_url(artifacts_dir: str | Path, source: UrlSource, refresh: str) -> StageRef:
    """A URL whose server gives no validator, on a refresh: downloaded again; its content hash
    keys the stage, so unchanged bytes reuse the finished one."""
    folder = hashlib.sha256(f"{source.url}\n{refresh}".encode()).hexdigest()[:16]
    got = _download(artifacts_dir, source, f"refresh-{folder}")
    digest = stage_key(FETCH, source, {"sha256": got.sha256})
    with stage_lock(artifacts_dir, FETCH.name, digest):
        if cached := find_stage(artifacts_dir, FETCH.name, digest):
            shutil.rmtree(got.path.parent, ignore_errors=True)
            return cached
        return _unpack(artifacts_dir, source, digest, got)


def _download(artifacts_dir: str | Path, source: UrlSource, folder: str) -> Downloaded:
    """Download the source's file into `downloads/<folder>/` (resuming a partial one) and check it."""
    part_path = Path(artifacts_dir) / "downloads" / folder / f"{url_file_name(source)}.part"
    return download(
        source.url, part_path, name=source.name, sha256=source.sha256,
        retries=source.retries, timeout_s=source.timeout_s,
    )  # fmt: skip


def url_file_name(source: UrlSource) -> str:
    return PurePosixPath(urlsplit(source.url).path).name or "download"


def _download_and_unpack(artifacts_dir: str | Path, source: UrlSource, digest: str) -> StageRef:
    return _unpack(artifacts_dir, source, digest, _download(artifacts_dir, source, digest))


def _unpack(artifacts_dir: str | Path, source: UrlSource, digest: str, got: Downloaded) -> StageRef:
    """The fetch stage of a finished download: its files unpacked; the download is removed."""
    file_name, part_path = url_file_name(source), got.path

    def write(writer: StageWriter) -> None:
        limits = UnpackLimits(source.max_unpacked_bytes, source.max_ratio)
        try:
            files, skipped = unpack(got.path, file_name, writer.path(DATA_DIR), limits, source.url)
        except FormatError as error:
            # The stage folder goes with this error; the download goes too: no retry unpacks it.
            shutil.rmtree(part_path.parent, ignore_errors=True)
            raise SourceError(f"source {source.name!r}: {error}") from None
        writer.stats = {
            "source": source.name, "kind": source.kind, "url": source.url, "fetched_at": now(),
            "sha256": got.sha256, "bytes": got.size, "tries": got.tries, "errors": got.errors,
            "files": [f.relative_to(writer.dir).as_posix() for f in files], "skipped_members": skipped,
        }  # fmt: skip

    fetched = reuse_or_write(artifacts_dir, FETCH, digest, write)
    shutil.rmtree(part_path.parent, ignore_errors=True)
    return fetched


def fetch_hf(artifacts_dir: str | Path, source: HfSource) -> StageRef:
    """Load a split through `datasets.load_dataset` and keep its rows, columns renamed, with the
    revision it came from."""
    revision = hf_revision(artifacts_dir, source)
    dataset = load_hf_split(source, revision if revision and ":" not in revision else None)

    def write(writer: StageWriter) -> None:
        missing = sorted(set(source.columns) - set(dataset.column_names))
        if missing:
            raise SourceError(
                f"source {source.name!r}: columns {missing} are not in {source.dataset} "
                f"(it has {dataset.column_names}); fix sources[].columns"
            )
        with open(writer.path(ROWS), "w") as out:
            for row in dataset:
                renamed = {source.columns.get(key, key): value for key, value in row.items()}
                out.write(json.dumps(renamed, ensure_ascii=False, default=str) + "\n")
        writer.stats = {
            "source": source.name, "kind": source.kind, "dataset": source.dataset, "split": source.split,
            "rows": dataset.num_rows, "fingerprint": dataset._fingerprint, "fetched_at": now(),
            "revision": revision,
        }  # fmt: skip

    return reuse_or_write(artifacts_dir, FETCH, stage_key(FETCH, source, dataset._fingerprint), write)


def hf_revision(artifacts_dir: str | Path, source: HfSource) -> str | None:
    """Which version of the data an hf source is: `sha256:<hex>` of a local file, `content:<hex>`
    of a local folder (each file's name and sha256), the hub's commit sha of the recipe's revision
    (or the default branch) when the hub is reachable; None offline or when it cannot say."""
    local = Path(source.dataset)
    if local.is_file():
        return "sha256:" + cached_sha256(artifacts_dir, [local])[local]
    if local.is_dir():
        return "content:" + hashlib.sha256(folder_key(artifacts_dir, local).encode()).hexdigest()[:16]
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().dataset_info(source.dataset, revision=source.revision).sha
    except Exception:  # noqa: BLE001 - an unknown revision is recorded as such; load_dataset reports
        return None


def load_hf_split(source: HfSource, commit: str | None = None) -> Any:
    """The split through `datasets.load_dataset`: a hub name (at `commit` when resolved, so the
    rows are the recorded revision's), a local folder, or a local data file (read with the
    builder its suffix names)."""
    import datasets  # costs seconds: only when a recipe has an hf source

    local = Path(source.dataset)
    builder = HF_FILE_BUILDERS.get(local.suffix.lower()) if local.is_file() else None
    try:
        if builder:
            return datasets.load_dataset(builder, data_files=str(local), split=source.split)
        return datasets.load_dataset(
            source.dataset, source.config, split=source.split, revision=commit or source.revision
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise SourceError(f"source {source.name!r}: cannot load {source.dataset}: {error}") from None
    except (ConnectionError, TimeoutError, OSError) as error:
        raise SourceUnreachable(f"source {source.name!r}: cannot load {source.dataset}: {error}") from error


def fetch_crawl(artifacts_dir: str | Path, source: CrawlSource, refresh: str | None = None) -> StageRef:
    """Crawl a site in a subprocess; kept items and every drop with its reason go to the stage.
    A site has no fingerprint to check: a plain run reuses the last crawl, a refresh crawls again."""
    cache_dir = Path(artifacts_dir).resolve() / "cache" / "crawl" / source.name

    def write(writer: StageWriter) -> None:
        result = run_crawl(
            source, writer.dir, cache_dir, revalidate=refresh is not None, digest=writer.digest
        )
        kept = sum(1 for _ in iter_jsonl(writer.dir / ITEMS))
        writer.count_in(kept)
        writer.records_out = kept
        drops_path = writer.dir / DROPS
        if drops_path.exists():
            for drop in iter_jsonl(drops_path):
                writer.count_in()
                writer.drop({"url": drop["url"], "kind": drop["kind"]}, drop["reason"], drop["detail"])
            drops_path.unlink()
        writer.stats = {
            "source": source.name, "kind": source.kind, "mode": source.mode, "fetched_at": now(),
            **crawl_summary(result.stats),
        }  # fmt: skip

    key = stage_key(FETCH, source) if refresh is None else stage_key(FETCH, source, {"refresh": refresh})
    return reuse_or_write(artifacts_dir, FETCH, key, write)
