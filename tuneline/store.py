"""The artifact store: one content-addressed folder per stage output, proven by a manifest.

A stage folder is `<artifacts_dir>/stages/<stage>/<digest>/` where the digest covers the stage
name, its recipe section, its inputs' digests and its code. Inside: the data, `rejects.jsonl`
(every dropped record with its reason), `stats.json`, and `manifest.json`, written last. Writes
happen in a temporary sibling folder renamed into place, so a crash or a retry never leaves a
half-written stage that a later one could read: no manifest, no stage.

Two runs in one project that would write the same stage do not interleave: the writer holds an OS
file lock per stage digest (`<artifacts_dir>/locks/<stage>/<digest>.lock`, `stage_lock`), a second
run waits on it, says whom it waits for, and then reuses the finished stage. A killed writer's
lock is released by the OS; its temporary folder is removed by `remove_stale_temporaries`.

Every manifest carries the ledger `records in = records out + sum(dropped by reason)`.

An `artifacts_dir` on an object store (s3://...) keeps this layout in a local folder per machine
and commits every stage to the store as well: tuneline/objectstore.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

from tuneline import __version__, objectstore
from tuneline.objectstore import sha256_file

FILE_DIGESTS = "file_digests.json"  # under <artifacts>/cache: path -> size, mtime_ns, sha256

MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
DOCUMENTS = "documents.jsonl"  # raw documents (crawled pages) beside the records, for grounded rounds
REJECTS = "rejects.jsonl"
STATS = "stats.json"
LOCKS = "locks"
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


class StageRef(BaseModel):
    """What tasks pass between each other: where a finished stage lies and its digest."""

    model_config = ConfigDict(frozen=True)

    stage: str
    digest: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def file(self, name: str) -> Path:
        """A file of the stage, e.g. ref.file(RECORDS)."""
        return Path(self.path) / name


class LedgerError(RuntimeError):
    """A stage whose counts do not add up: records were lost or invented."""


class StageCorrupt(RuntimeError):
    """A finished stage whose files no longer match their manifest."""


def stage_digest(stage: str, *parts: Any) -> str:
    """Digest of everything that decides a stage's output: name, section, input digests, code."""
    payload = json.dumps([stage, __version__, *parts], sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot digest {type(value).__name__}")


def files_digest(*paths: str | Path) -> str:
    """Digest of files' contents (a suite, benchmark files), so that changing one re-runs a stage."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(read_code(Path(path)))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: its one name (folder, task, manifest, MLflow keys, report, CLI),
    the module that runs it, and the modules and packages whose source decides its output.

    `code` names are looked up without importing them (a stage found finished costs no import
    of torch or Scrapy); a package stands for every `.py` file under it. tests/test_layout.py
    checks that `code` covers every project module that `entry` imports, directly or not.
    """

    name: str
    entry: str
    code: tuple[str, ...]


def read_code(path: Path) -> bytes:
    """The bytes of a source file as digested (one place, so a test can change a file's code)."""
    return path.read_bytes()


@cache
def stage_code_files(stage: Stage) -> tuple[Path, ...]:
    """Every source file that `stage.code` names, sorted and without duplicates."""
    files: set[Path] = set()
    for name in stage.code:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None and not spec.submodule_search_locations:
            raise StageCorrupt(f"stage {stage.name}: cannot find module {name}; reinstall Tuneline")
        if spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                files.update(Path(location).resolve().rglob("*.py"))
        else:
            files.add(Path(spec.origin).resolve())
        # Importing a module runs its packages' __init__ first.
        for depth in range(1, name.count(".")):
            package = importlib.util.find_spec(name.rsplit(".", depth)[0])
            if package is not None and package.origin:
                files.add(Path(package.origin).resolve())
    return tuple(sorted(files))


def code_digest(stage: Stage) -> str:
    """Digest of the stage's source files, by file name and content: the same code in another
    folder (a second clone of the project) has the same digest."""
    digest = hashlib.sha256()
    for path in stage_code_files(stage):
        digest.update(path.name.encode())
        digest.update(read_code(path))
    return digest.hexdigest()[:16]


def stage_key(stage: Stage, *parts: Any) -> str:
    """The digest of one output of `stage`: its name, `parts` (section, inputs' digests) and code."""
    return stage_digest(stage.name, *parts, code_digest(stage))


def reuse_or_write(
    artifacts_dir: str | Path,
    stage: Stage,
    digest: str,
    write: Callable[[StageWriter], None],
    inputs: list[StageRef] = (),
) -> StageRef:
    """The finished stage with this digest, or else the one `write` fills, written atomically.

    Under the stage's lock: a run that waited for another writing the same stage reuses its result.
    """
    if cached := find_stage(artifacts_dir, stage.name, digest):
        return cached
    with stage_lock(artifacts_dir, stage.name, digest):
        if cached := find_stage(artifacts_dir, stage.name, digest):
            return cached
        with write_stage(artifacts_dir, stage.name, digest, inputs) as writer:
            write(writer)
    return find_stage(artifacts_dir, stage.name, digest)


def stage_dir(artifacts_dir: str | Path, stage: str, digest: str) -> Path:
    return Path(artifacts_dir) / "stages" / stage / digest


def _stage_file_lock(artifacts_dir: str | Path, stage: str, digest: str) -> FileLock:
    """The lock of one stage digest: one object per path in this process (re-entered by the thread
    that holds it; other threads and processes wait), an flock the OS drops when its holder dies."""
    path = Path(artifacts_dir).resolve() / LOCKS / stage / f"{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, is_singleton=True)


@contextmanager
def stage_lock(artifacts_dir: str | Path, stage: str, digest: str) -> Iterator[None]:
    """Hold the lock of one stage output while finding or writing it, so two runs never write the
    same stage at once. A run that has to wait logs which process holds it, then waits."""
    lock = _stage_file_lock(artifacts_dir, stage, digest)
    owner_path = Path(lock.lock_file).with_suffix(".owner")
    outermost = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(
            "waiting for %s, which is writing stage %s %s; this run reuses it once it is done",
            _describe_owner(owner_path),
            stage,
            digest,
        )
        lock.acquire()
    try:
        if outermost:
            owner_path.write_text(json.dumps(_owner()), encoding="utf-8")
        yield
    finally:
        if outermost:
            owner_path.unlink(missing_ok=True)
        lock.release()


def _owner() -> dict[str, Any]:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    return {"pid": os.getpid(), "command": command, "since": datetime.now(UTC).isoformat(timespec="seconds")}


def _describe_owner(owner_path: Path) -> str:
    try:
        owner = json.loads(owner_path.read_text(encoding="utf-8"))
        return f"pid {owner['pid']} ({owner['command']}, since {owner['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def remove_stale_temporaries(artifacts_dir: str | Path) -> list[Path]:
    """Remove the temporary stage folders that killed runs left behind, and no other.

    A writer holds its stage's lock for as long as its temporary folder exists, so a folder whose
    lock is free belongs to no live process (a process id could have been reused; a lock cannot).
    """
    removed = []
    for tmp in sorted(Path(artifacts_dir).glob(f"stages/*/{TMP_PREFIX}*")):
        digest = tmp.name.removeprefix(TMP_PREFIX).rpartition("-")[0]
        lock = _stage_file_lock(artifacts_dir, tmp.parent.name, digest)
        if lock.is_locked:  # this thread is writing it
            continue
        try:
            lock.acquire(timeout=0)
        except Timeout:  # a live run is writing it
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            lock.release()
    return removed


def find_stage(artifacts_dir: str | Path, stage: str, digest: str) -> StageRef | None:
    """The finished stage with this digest, or None: a folder without a manifest does not count.

    With an object store bound to the folder (tuneline/objectstore.py) the store is the truth: a
    stage committed there by another machine is copied here, and a local copy of a stage the
    store does not hold (removed by retention elsewhere) does not count.
    """
    folder = stage_dir(artifacts_dir, stage, digest)
    found = StageRef(stage=stage, digest=digest, path=str(folder.resolve()))
    remote = objectstore.bound_store(artifacts_dir)
    if remote is None:
        return found if (folder / MANIFEST).is_file() else None
    if (stage, digest) in remote.committed and (folder / MANIFEST).is_file():
        return found
    manifest = remote.read_manifest(stage, digest)
    if manifest is None:
        return None
    if not (folder / MANIFEST).is_file():
        with stage_lock(artifacts_dir, stage, digest):
            if not (folder / MANIFEST).is_file():
                objectstore.fetch_stage(remote, folder, manifest)
    remote.committed.add((stage, digest))
    return found


class StageWriter:
    """Collects a stage's outputs in a temporary folder and its ledger while records stream by."""

    def __init__(self, tmp_dir: Path, stage: str, digest: str, inputs: list[StageRef]) -> None:
        self.dir = tmp_dir
        self.stage = stage
        self.digest = digest
        self.inputs = inputs
        self.records_in = 0
        self.records_out = 0
        self.dropped: Counter[str] = Counter()
        self.stats: dict[str, Any] = {}
        self._handles: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        """Where to write an extra file (a model, a report) inside the stage."""
        return self.dir / name

    def count_in(self, n: int = 1) -> None:
        self.records_in += n

    def keep(self, record: dict[str, Any], name: str = RECORDS) -> None:
        """Write a record to the stage's output."""
        self._write_line(name, record)
        self.records_out += 1

    def drop(self, record: Any, reason: str, detail: str | None = None) -> None:
        """Quarantine a record in rejects.jsonl; `reason` is the short key counted in the ledger."""
        self._write_line(REJECTS, {"reason": reason, "detail": detail, "record": record})
        self.dropped[reason] += 1

    def _write_line(self, name: str, obj: Any) -> None:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = open(self.dir / name, "w", encoding="utf-8")  # noqa: SIM115
        handle.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def close_files(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


@contextmanager
def write_stage(
    artifacts_dir: str | Path, stage: str, digest: str, inputs: list[StageRef] = (), *, lock: bool = True
) -> Iterator[StageWriter]:
    """Write a stage atomically: yields a writer, then checks the ledger, writes the manifest
    last and renames the folder into place. On any error the temporary folder is removed.

    Holds the stage's lock (`stage_lock`) unless `lock` is False: for a process whose parent
    holds it (a launched training worker), which would otherwise wait for its own parent.
    """
    with (
        stage_lock(artifacts_dir, stage, digest) if lock else nullcontext(),
        _write_atomically(artifacts_dir, stage, digest, inputs) as writer,
    ):
        yield writer


@contextmanager
def _write_atomically(
    artifacts_dir: str | Path, stage: str, digest: str, inputs: list[StageRef]
) -> Iterator[StageWriter]:
    final = stage_dir(artifacts_dir, stage, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{digest}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writer = StageWriter(tmp, stage, digest, list(inputs))
    try:
        yield writer
        writer.close_files()
        (tmp / REJECTS).touch()  # always present, so "no rejects" is a file you can open
        check_ledger_counts(stage, writer.records_in, writer.records_out, writer.dropped)
        (tmp / STATS).write_text(json.dumps(writer.stats, indent=2, default=str), encoding="utf-8")
        manifest = {
            "stage": stage,
            "digest": digest,
            "code_version": __version__,
            "inputs": [{"stage": ref.stage, "digest": ref.digest} for ref in writer.inputs],
            "ledger": {
                "in": writer.records_in,
                "out": writer.records_out,
                "dropped": dict(sorted(writer.dropped.items())),
            },
            "files": {name: sha256_file(tmp / name) for name in sorted(_relative_files(tmp))},
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if remote := objectstore.bound_store(artifacts_dir):  # the store's manifest is the commit
            manifest = remote.publish(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if final.exists():  # a stage without manifest left by a crash before the rename
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        writer.close_files()
        shutil.rmtree(tmp, ignore_errors=True)


def _relative_files(folder: Path) -> Iterator[str]:
    for path in folder.rglob("*"):
        if path.is_file():
            yield path.relative_to(folder).as_posix()


def cached_sha256(artifacts_dir: str | Path, paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, remembered by path, size and modification time in
    `<artifacts_dir>/cache/file_digests.json` (model weights are GBs; a changed file is read again)."""
    cache_path = Path(artifacts_dir) / "cache" / FILE_DIGESTS
    known = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    digests, changed = {}, False
    for path in paths:
        status, key = path.stat(), str(path.resolve())
        entry = known.get(key)
        if not entry or entry["size"] != status.st_size or entry["mtime_ns"] != status.st_mtime_ns:
            entry = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": sha256_file(path)}
            known[key], changed = entry, True
        digests[path] = entry["sha256"]
    if changed:  # a cache: two runs writing at once may each lose the other's entries, never corrupt it
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{FILE_DIGESTS}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        tmp.replace(cache_path)
    return digests


def folder_key(artifacts_dir: str | Path, folder: Path) -> str:
    """A local folder (a model) by content: each file's relative name and sha256, wherever it lies."""
    digests = cached_sha256(artifacts_dir, sorted(path for path in folder.rglob("*") if path.is_file()))
    return "folder:" + json.dumps(
        [(path.relative_to(folder).as_posix(), digests[path]) for path in sorted(digests)]
    )


def check_ledger_counts(stage: str, records_in: int, records_out: int, dropped: dict[str, int]) -> None:
    """The invariant every stage keeps: nothing lost, nothing invented."""
    if records_in != records_out + sum(dropped.values()):
        raise LedgerError(
            f"stage {stage}: {records_in} records in but {records_out} out + "
            f"{sum(dropped.values())} dropped {dict(dropped)}; a record was lost or invented"
        )


def read_manifest(ref: StageRef) -> dict[str, Any]:
    return json.loads(ref.file(MANIFEST).read_text(encoding="utf-8"))


def read_stats(ref: StageRef) -> dict[str, Any]:
    return json.loads(ref.file(STATS).read_text(encoding="utf-8"))


def check_ledger(ref: StageRef) -> dict[str, Any]:
    """Re-check a finished stage's ledger from its manifest; returns the ledger."""
    ledger = read_manifest(ref)["ledger"]
    check_ledger_counts(ref.stage, ledger["in"], ledger["out"], ledger["dropped"])
    return ledger


def verify_stage(ref: StageRef) -> None:
    """Check every file against the manifest's sha256, before trusting a cached stage."""
    for name, expected in read_manifest(ref)["files"].items():
        path = ref.file(name)
        if not path.is_file() or sha256_file(path) != expected:
            raise StageCorrupt(
                f"{path}: missing or changed since the stage finished; delete {ref.path} to re-run it"
            )


def iter_records(ref: StageRef, name: str = RECORDS) -> Iterator[dict[str, Any]]:
    """Stream the records of a finished stage."""
    return iter_jsonl(ref.file(name))


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Stream a JSON-lines file Tuneline wrote (a stage's file, or one being written); none if absent."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)
