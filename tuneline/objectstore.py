"""Stages on an object store (S3, GCS, Azure or any fsspec file system), with a local copy per machine.

A recipe whose `artifacts_dir` is a URL (`s3://bucket/prefix`) keeps its stages there. Every
machine works in a local folder (`Recipe.work_dir`: its copies of the stages it read or wrote, its
locks, checkpoints and logs), bound to the store by `object_store.json` in that folder, so every
process that is handed the folder (a task, a launched training worker) finds the store again.

On an object store a rename is not atomic, so the manifest is the commit:

    <url>/stages/<stage>/<digest>/manifest.json            written last; names the attempt below
    <url>/stages/<stage>/<digest>/<attempt>/<file> ...     the stage's files (same layout as on disk)

A writer uploads its files under a fresh attempt prefix and then the manifest, so a stage without
its manifest does not exist, a write killed half-way leaves only an attempt nobody reads, and two
machines writing the same stage at once each commit a complete set (the last manifest wins).
Large files go up in multipart uploads, streamed from disk. A machine that needs a stage it does
not have downloads it into its local folder, checking every file against the manifest's sha256.

Credentials and endpoints come from the environment, as for the store's own tools (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneline.errors import UserError

BINDING = "object_store.json"
MANIFEST = "manifest.json"
STAGES = "stages"
# Written last into a checkpoint folder by the trainer, uploaded last: a checkpoint without it is partial.
CHECKPOINT_COMMIT = "trainer_state.json"
# s3fs uploads a file in parts of this size once it is twice as large: the upload streams from
# disk with bounded memory (s3fs's default, 50 MiB, sends files below 100 MiB in one request).
S3_PART_SIZE = 16 << 20

log = logging.getLogger(__name__)


class ObjectStoreError(UserError, RuntimeError):
    """The object store cannot be reached or refuses: says which URL and what to check."""


def is_url(artifacts_dir: str | Path) -> bool:
    """Whether `artifacts_dir` names an object store (`scheme://...`) rather than a local folder."""
    return "://" in str(artifacts_dir)


def local_artifacts_dir(artifacts_dir: str, local_dir: str | None) -> str:
    """This machine's artifacts folder: `artifacts_dir` when it is one, else `local_dir`, else
    `.tuneline/stores/<scheme>/<bucket>/<prefix>`, so two stores never share one."""
    if not is_url(artifacts_dir):
        return artifacts_dir
    if local_dir:
        return local_dir
    parts = urlsplit(artifacts_dir)
    return str(Path(".tuneline", "stores", parts.scheme, parts.netloc, *parts.path.strip("/").split("/")))


def check_url(url: str) -> None:
    """Refuse a URL that fsspec cannot open or that carries a secret (a recipe field's validator:
    pydantic names the field); the message names the fix."""
    import fsspec

    parts = urlsplit(url)
    if parts.password or parts.username:
        raise ValueError(
            f"{parts.scheme}://{parts.hostname}{parts.path} has credentials in it, which would be "
            "written to the run's recipe.yaml and parameters; give them in the environment "
            "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and remove them from the URL"
        )
    if parts.scheme in ("file", "local"):
        raise ValueError(
            f"{url!r}: for a local or mounted folder give its path ({parts.path or '/PATH'}), not a URL"
        )
    if not parts.netloc:
        raise ValueError(f"{url!r} names no bucket; write {parts.scheme}://BUCKET/PREFIX")
    if parts.scheme not in fsspec.available_protocols():
        raise ValueError(
            f"{parts.scheme!r} in {url!r} is not a file system fsspec knows; use s3://, gs://, "
            "az:// (abfs://) or another fsspec protocol, or a local folder"
        )


@dataclass
class ObjectStore:
    """One store URL and its fsspec file system."""

    url: str
    fs: Any = field(repr=False)
    put_options: dict[str, Any] = field(default_factory=dict)
    # (stage, digest) this process saw committed: found again without asking the store.
    committed: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def open(cls, url: str) -> ObjectStore:
        import fsspec

        try:
            # No listings cache: another machine's commit must be seen at the next look.
            fs, _ = fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
        except ImportError as error:
            raise ObjectStoreError(
                f"artifacts_dir: {url} needs a package that is not installed ({error}); "
                "`pip install s3fs` (S3), `gcsfs` (GCS) or `adlfs` (Azure)"
            ) from None
        return cls(url.rstrip("/"), fs, {"chunksize": S3_PART_SIZE} if "s3" in fs.protocol else {})

    def key(self, *parts: str) -> str:
        """The store path of `parts` under the URL's prefix (without the scheme, as fsspec takes it)."""
        return "/".join([self.fs._strip_protocol(self.url), *parts])

    def stage_key(self, stage: str, digest: str, *parts: str) -> str:
        return self.key(STAGES, stage, digest, *parts)

    def read_manifest(self, stage: str, digest: str) -> dict[str, Any] | None:
        """The committed manifest of a stage, or None: an attempt without one does not exist."""
        try:
            with self._errors("read"):
                return json.loads(self.fs.cat_file(self.stage_key(stage, digest, MANIFEST)))
        except FileNotFoundError:
            return None

    def manifests(self, stage: str) -> dict[str, dict[str, Any]]:
        """The committed manifests of every stage of this kind in the store, by digest."""
        with self._errors("read"):
            paths = self.fs.glob(self.stage_key(stage, "*", MANIFEST))
            return {path.split("/")[-2]: json.loads(self.fs.cat_file(path)) for path in sorted(paths)}

    def remove_stage(self, stage: str, digest: str) -> None:
        """Delete a stage from the store: its manifest first (from then on it does not exist),
        then its attempts."""
        self.committed.discard((stage, digest))
        with self._errors("delete"):
            with suppress(FileNotFoundError):
                self.fs.rm_file(self.stage_key(stage, digest, MANIFEST))
            if self.fs.exists(self.stage_key(stage, digest)):
                self.fs.rm(self.stage_key(stage, digest), recursive=True)

    def publish(self, folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload a finished stage's files under a fresh attempt, then its manifest (the commit).
        Returns the manifest as committed (with its `attempt`)."""
        stage, digest = manifest["stage"], manifest["digest"]
        attempt = uuid.uuid4().hex[:12]
        committed = {**manifest, "attempt": attempt}
        with self._errors("write"):
            for name in sorted(manifest["files"]):
                self.fs.put_file(
                    str(folder / name), self.stage_key(stage, digest, attempt, name), **self.put_options
                )
            self.fs.pipe_file(
                self.stage_key(stage, digest, MANIFEST), json.dumps(committed, indent=2).encode()
            )
        self.committed.add((stage, digest))
        log.info("published stage %s %s to %s (attempt %s)", stage, digest, self.url, attempt)
        return committed

    def download(self, manifest: dict[str, Any], folder: Path) -> None:
        """Download a committed stage's files into `folder` and check each against the manifest;
        the caller writes the manifest last and renames the folder into place."""
        stage, digest, attempt = manifest["stage"], manifest["digest"], manifest["attempt"]
        with self._errors("read"):
            for name, expected in manifest["files"].items():
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.stage_key(stage, digest, attempt, name), str(target))
                if sha256_file(target) != expected:
                    raise ObjectStoreError(
                        f"{self.stage_key(stage, digest, attempt, name)}: its sha256 differs from the "
                        f"stage's manifest; the store was changed after the stage was committed; delete "
                        f"{self.url}/{STAGES}/{stage}/{digest}/ to run the stage again"
                    )

    def upload_folder(self, folder: Path, key: str, last: str | None = None) -> None:
        """Upload every file of a local folder under `key`, `last` after all others."""
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        files.sort(key=lambda path: path.name == last)
        with self._errors("write"):
            for path in files:
                self.fs.put_file(
                    str(path), f"{key}/{path.relative_to(folder).as_posix()}", **self.put_options
                )

    def download_folder(self, key: str, folder: Path) -> None:
        with self._errors("read"):
            for remote in self.fs.find(key):
                target = folder / remote[len(key) :].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(target))

    def _errors(self, action: str) -> _StoreErrors:
        return _StoreErrors(self.url, action)


class _StoreErrors:
    """Turns a refused or unreachable store into an ObjectStoreError naming the URL and the fix."""

    def __init__(self, url: str, action: str) -> None:
        self.url, self.action = url, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if error is None or isinstance(error, FileNotFoundError | ObjectStoreError):
            return False
        if isinstance(error, PermissionError | OSError) or type(error).__module__.split(".")[0] in (
            "botocore",
            "aiobotocore",
            "aiohttp",
            "s3fs",
            "gcsfs",
            "adlfs",
        ):
            raise ObjectStoreError(
                f"artifacts_dir: cannot {self.action} {self.url}: {type(error).__name__}: {error}; check "
                "that the bucket exists, the credentials in the environment (for S3: AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL for an S3-compatible server)"
            ) from error
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bind(local_dir: str | Path, url: str) -> Path:
    """Bind a machine's local folder to the store at `url` (once; a second URL is refused) and
    return the folder, resolved. Every process handed the folder finds the store through it."""
    folder = Path(local_dir).resolve()
    path = folder / BINDING
    if path.is_file():
        bound = json.loads(path.read_text(encoding="utf-8"))["url"]
        if bound.rstrip("/") != url.rstrip("/"):
            raise UserError(
                f"local_dir: {folder} holds the stages of {bound}, not of artifacts_dir {url}; "
                "give this store its own local_dir (or leave local_dir unset)"
            )
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{BINDING}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps({"url": url.rstrip("/")}), encoding="utf-8")
    os.replace(tmp, path)
    return folder


def open_artifacts(artifacts_dir: str, work_dir: str) -> Path:
    """The local artifacts folder a run works in (resolved). For an object store, checks that its
    bucket can be reached and binds `work_dir` to it, so every stage is committed there."""
    if not is_url(artifacts_dir):
        return Path(work_dir).resolve()
    store = ObjectStore.open(artifacts_dir)
    bucket = store.key().split("/")[0]
    try:
        with store._errors("reach"):
            store.fs.info(bucket)
    except FileNotFoundError:
        raise ObjectStoreError(
            f"artifacts_dir: the bucket {bucket!r} of {artifacts_dir} does not exist (or these "
            "credentials cannot see it); create it, or fix the URL"
        ) from None
    return bind(work_dir, artifacts_dir)


_bound: dict[Path, ObjectStore | None] = {}


def bound_store(local_dir: str | Path) -> ObjectStore | None:
    """The object store a local folder is bound to, or None for a plain local artifacts folder."""
    folder = Path(local_dir).resolve()
    if folder not in _bound or _bound[folder] is None:
        path = folder / BINDING
        url = json.loads(path.read_text(encoding="utf-8"))["url"] if path.is_file() else None
        _bound[folder] = ObjectStore.open(url) if url else None
    return _bound[folder]


def fetch_stage(store: ObjectStore, final: Path, manifest: dict[str, Any]) -> None:
    """Copy a committed stage from the store into `final` (a local stage folder), atomically."""
    tmp = final.parent / f".tmp-{manifest['digest']}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        store.download(manifest, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if final.exists():  # a local folder without manifest left by a crash
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied stage %s %s from %s", manifest["stage"], manifest["digest"], store.url)


def checkpoint_key(store: ObjectStore, artifacts_dir: str | Path, work_dir: Path) -> str:
    """Where a training's checkpoints go in the store: the same path under it as under the folder."""
    return store.key(Path(work_dir).resolve().relative_to(Path(artifacts_dir).resolve()).as_posix())


def upload_checkpoint(artifacts_dir: str | Path, checkpoint: Path) -> None:
    """Upload one finished `checkpoint-N` folder of a training (its trainer state last), so a
    training resumed on another machine continues from it. Nothing without a bound store."""
    store = bound_store(artifacts_dir)
    if store is None:
        return
    key = checkpoint_key(store, artifacts_dir, checkpoint.parent)
    store.upload_folder(checkpoint, f"{key}/{checkpoint.name}", last=CHECKPOINT_COMMIT)
    log.info("uploaded %s to %s", checkpoint.name, store.url)


def remove_checkpoints(artifacts_dir: str | Path, work_dir: Path) -> None:
    """Delete a finished training's uploaded checkpoints (its stage is committed: nothing resumes
    from them any more). Nothing without a bound store."""
    store = bound_store(artifacts_dir)
    if store is None:
        return
    key = checkpoint_key(store, artifacts_dir, work_dir)
    with store._errors("delete"):
        if store.fs.exists(key):
            store.fs.rm(key, recursive=True)


def download_checkpoint(artifacts_dir: str | Path, work_dir: Path) -> Path | None:
    """The newest complete checkpoint a training with this `work_dir` uploaded, downloaded into it,
    or None (no store, or none uploaded). Used when the local folder has no checkpoint."""
    store = bound_store(artifacts_dir)
    if store is None:
        return None
    key = checkpoint_key(store, artifacts_dir, work_dir)
    with store._errors("read"):
        committed = [path for path in store.fs.glob(f"{key}/checkpoint-*/{CHECKPOINT_COMMIT}")]
    steps = sorted(
        (int(name), name)
        for name in (path.split("/")[-2].removeprefix("checkpoint-") for path in committed)
        if name.isdigit()
    )
    if not steps:
        return None
    name = f"checkpoint-{steps[-1][1]}"
    store.download_folder(f"{key}/{name}", work_dir / name)
    log.info("resuming from %s downloaded from %s", name, store.url)
    return work_dir / name
