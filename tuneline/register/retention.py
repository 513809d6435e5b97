"""Retention: trained models nobody keeps are removed after `register.retention_days`.

What expires: a train or pretrain stage whose manifest finished more than `retention_days` ago
and that nothing holds. A train stage is held by an alias on any of its registered versions
(versions carry `tuneline.train_digest`), by an export (the version's `tuneline.exported` tag, or
a line of `<artifacts_dir>/exports.jsonl` naming its train digest), or by a live run (its stage
lock is taken, or a run is writing a stage that may read it). A pretrain stage is held while a
train stage that stays names it. With a train stage go the stages built from it (manifest
`inputs`, followed transitively: evaluate, benchmarks and the tuned side's benchmark stages,
judge, compare, register), so no cached stage points at a removed model; a re-run of the recipe
trains again instead of reading a missing folder.

Its MLflow versions are deleted, not archived: MLflow 3 deprecated stages (Archived) in favour of
aliases, and an archived version keeps the copy of the weights its logged model holds, which is
what retention frees; that logged model's files are deleted with it. The MLflow runs stay for
their metrics, params and curves, tagged `tuneline.removed` with the date and what went.

Never touched: the data stages and their ledgers (fetch, collect, augment, review journals,
clean, gate, split), base_model and select stages, the compare ledgers, exports.

Removal is crash-safe and idempotent: MLflow first, then each stage folder, the stages built
from the model before the model, each renamed to a `.tmp-` name (a reader never sees a stage half
deleted with its manifest) and then deleted. A removal killed half-way is finished by the next
retention run or by `store.remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from filelock import Timeout
from pydantic import BaseModel

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
import tuneline.experiment  # noqa: F401

# isort: split
import mlflow
from mlflow.exceptions import MlflowException

from tuneline.errors import UserError
from tuneline.objectstore import bound_store
from tuneline.register.registry import registry_lock
from tuneline.register.run_details import EXPORTED_TAG
from tuneline.store import (
    MANIFEST,
    STATS,
    TMP_PREFIX,
    _stage_file_lock,
    remove_stale_temporaries,
    stage_dir,
)

MODEL_STAGES = ("train", "pretrain")
# The stages built from a trained model, in the order they are removed (later stages first).
BUILT_FROM_MODEL = ("register", "compare", "judge", "benchmarks", "benchmark", "evaluate")
EXPORTS_FILE = "exports.jsonl"  # {train_digest, version, format, to, at} per export
REMOVED_TAG = "tuneline.removed"
TRAIN_DIGEST_TAG = "tuneline.train_digest"  # set by the register stage (as register.champion reads it)
REFERENCE_FILES = ("stats.json", "adapter/adapter_config.json", "model/config.json")


class StageItem(BaseModel):
    """One stage folder that goes with a model."""

    stage: str
    digest: str
    path: str
    bytes: int


class ModelEntry(BaseModel):
    """A train or pretrain stage, whether it goes and why (`reasons`), and what goes with it."""

    stage: str
    digest: str
    path: str
    created: datetime
    expires: datetime
    action: Literal["remove", "keep"]
    reasons: list[str]
    bytes: int  # the model's folder, the stages built from it and its logged MLflow models
    stages: list[StageItem] = []  # built from the model: removed with it
    versions: list[str] = []  # models:/NAME/VERSION


class RetentionPlan(BaseModel):
    """What a retention run would do at `now`: every model stage, to remove or to keep."""

    artifacts_dir: str
    tracking_uri: str
    retention_days: int
    now: datetime
    entries: list[ModelEntry]


class RetentionReport(BaseModel):
    """What a retention run did (`dry_run`: would do): removed and kept models, bytes freed."""

    dry_run: bool
    now: datetime
    retention_days: int
    removed: list[ModelEntry]
    kept: list[ModelEntry]
    bytes_freed: int
    versions_deleted: list[str]
    temporaries_cleared: int = 0  # folders of killed runs or unfinished removals finished now


class Version(BaseModel):
    """A registered version of a train stage, as retention needs it."""

    name: str
    version: str
    aliases: list[str]
    exported: str | None
    run_id: str | None
    source: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def expires_at(created: datetime, retention_days: float) -> datetime:
    """When a model made at `created` expires: `retention_days` later (UTC). `tuneline runs list`
    shows its date, and retention removes an unheld model from then on."""
    return as_utc(created) + timedelta(days=float(retention_days))


def expiry(created: datetime, retention_days: float, held_by: list[str]) -> str:
    """The `expires` cell of `tuneline runs list`: `kept` when an alias or an export holds the
    model (`held_by`, from `holders`), else the day retention may remove it."""
    return "kept" if held_by else expires_at(created, retention_days).date().isoformat()


def holders(aliases: Iterable[str], exported_tags: Iterable[str | None], exports: list[dict]) -> list[str]:
    """Why a model is kept whatever its age: its aliases and its exports (the exports.jsonl lines,
    else the versions' `tuneline.exported` tags, which say the same about one export each)."""
    found = [f"alias {alias}" for alias in aliases]
    places = [f"{line.get('format')} to {line.get('to')}" for line in exports]
    places = list(dict.fromkeys(places)) or [tag for tag in exported_tags if tag]
    if places:
        found.append(f"exported ({'; '.join(places)})")
    return found


def as_utc(moment: datetime) -> datetime:
    """A naive datetime is taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def model_created(manifest: dict[str, Any]) -> datetime:
    """When a stage finished: its manifest's `finished_at`."""
    return as_utc(datetime.fromisoformat(manifest["finished_at"]))


def read_exports(artifacts_dir: str | Path) -> dict[str, list[dict]]:
    """The lines of `<artifacts_dir>/exports.jsonl` by train digest. A line that cannot be read
    stops retention (skipping it could remove an exported model)."""
    path = Path(artifacts_dir) / EXPORTS_FILE
    found: dict[str, list[dict]] = defaultdict(list)
    if not path.is_file():
        return found
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            found[str(entry["train_digest"])].append(entry)
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path}:{number}: not an export line ({line[:80]!r}); each line is a JSON object with "
                "train_digest, version, format, to, at. Fix or remove the line, then run retention again"
            ) from None
    return found


def open_client(tracking_uri: str) -> mlflow.MlflowClient | None:
    """A client of the store, or None when its SQLite file does not exist (nothing registered)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None
    return mlflow.MlflowClient(tracking_uri)


def registered_versions(client: mlflow.MlflowClient | None) -> dict[str, list[Version]]:
    """Every registered version that names its train stage, by train digest, with its aliases
    (searches return no aliases: they come from each registered model)."""
    if client is None:
        return {}
    tagged = [version for version in all_versions(client) if TRAIN_DIGEST_TAG in version.tags]
    aliases: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in sorted({version.name for version in tagged}):
        for alias, number in client.get_registered_model(name).aliases.items():  # ints in MLflow 3
            aliases[(name, str(number))].append(alias)
    found: dict[str, list[Version]] = defaultdict(list)
    for version in tagged:
        number = str(version.version)
        found[version.tags[TRAIN_DIGEST_TAG]].append(
            Version(
                name=version.name,
                version=number,
                aliases=sorted(aliases[(version.name, number)]),
                exported=version.tags.get(EXPORTED_TAG),
                run_id=version.run_id,
                source=version.source,
            )
        )
    return found


def all_versions(client: mlflow.MlflowClient) -> Iterator[Any]:
    """Every model version of the registry, page after page (a search returns one page)."""
    token = None
    while True:
        page = client.search_model_versions(page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def stage_manifests(artifacts_dir: str | Path, stages: Iterable[str]) -> dict[tuple[str, str], dict]:
    """The manifests of the finished stages of these kinds, by (stage, digest)."""
    found = {}
    remote = bound_store(artifacts_dir)  # an object store: its stages, not only this machine's copies
    for stage in stages:
        for path in sorted((Path(artifacts_dir) / "stages" / stage).glob(f"*/{MANIFEST}")):
            if not path.parent.name.startswith(TMP_PREFIX):
                found[(stage, path.parent.name)] = json.loads(path.read_text(encoding="utf-8"))
        for digest, manifest in (remote.manifests(stage) if remote else {}).items():
            found.setdefault((stage, digest), manifest)
    return found


def built_from(artifacts_dir: str | Path, manifests: dict[tuple[str, str], dict]) -> dict[tuple, set]:
    """Which stages each stage's output went into: manifest `inputs`, plus the tuned model's
    benchmark stages that a benchmarks stage names in its stats (they record no inputs)."""
    children: dict[tuple, set] = defaultdict(set)
    for key, manifest in manifests.items():
        for entry in manifest.get("inputs") or []:
            children[(entry["stage"], entry["digest"])].add(key)
        if key[0] == "benchmarks":
            stats_path = Path(artifacts_dir) / "stages" / key[0] / key[1] / STATS
            stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
            for digest in (stats.get("stages") or {}).get("tuned") or []:
                if ("benchmark", digest) in manifests:
                    children[key].add(("benchmark", digest))
    return children


def downstream(key: tuple[str, str], children: dict[tuple, set]) -> list[tuple[str, str]]:
    """Every stage built from `key`, transitively, among BUILT_FROM_MODEL, in removal order."""
    seen: set[tuple[str, str]] = set()
    todo = [key]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child[0] in BUILT_FROM_MODEL and child not in seen:
                seen.add(child)
                todo.append(child)
    return sorted(seen, key=lambda item: (BUILT_FROM_MODEL.index(item[0]), item[1]))


def folder_bytes(path: Path) -> int:
    """The size of a folder's files."""
    return sum(item.lstat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())


def lock_free(artifacts_dir: str | Path, stage: str, digest: str) -> bool:
    """Whether no live run holds the stage's lock (writing it, or waiting to reuse it)."""
    lock = _stage_file_lock(artifacts_dir, stage, digest)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def live_writers(artifacts_dir: str | Path, model_stage: str) -> list[str]:
    """The stages live runs are writing now that may read a model of `model_stage` whose stage
    folder says nothing yet (its manifest, with the inputs, comes last): while one runs, retention
    removes no model of that kind. A stage built from a model reads any train stage (and the
    pretrain stage under an adapter); a training reads only a pretrain stage."""
    busy = []
    for stage in (*BUILT_FROM_MODEL, *(("train",) if model_stage == "pretrain" else ())):
        for tmp in sorted((Path(artifacts_dir) / "stages" / stage).glob(f"{TMP_PREFIX}*")):
            digest = tmp.name.removeprefix(TMP_PREFIX).rpartition("-")[0]
            if not lock_free(artifacts_dir, stage, digest):
                busy.append(f"{stage} {digest}")
    return busy


def plan_retention(
    artifacts_dir: str | Path, tracking_uri: str, retention_days: int, now: datetime | None = None
) -> RetentionPlan:
    """Every train and pretrain stage of the store, to remove or to keep, and why, at `now`
    (default: the current time). Reads only: `apply_retention` removes."""
    now = as_utc(now or datetime.now(UTC))
    manifests = stage_manifests(artifacts_dir, (*MODEL_STAGES, *BUILT_FROM_MODEL))
    children = built_from(artifacts_dir, manifests)
    client = open_client(tracking_uri)
    versions = registered_versions(client)
    exports = read_exports(artifacts_dir)
    writers = {stage: live_writers(artifacts_dir, stage) for stage in MODEL_STAGES}
    context = {"versions": versions, "exports": exports, "writers": writers, "children": children}
    context["manifests"] = manifests
    trains = [
        plan_model(artifacts_dir, "train", digest, retention_days, now, context, client)
        for stage, digest in manifests
        if stage == "train"
    ]
    staying = [entry for entry in trains if entry.action == "keep"]
    pretrains = [
        plan_model(artifacts_dir, "pretrain", digest, retention_days, now, context, client, staying)
        for stage, digest in manifests
        if stage == "pretrain"
    ]
    return RetentionPlan(
        artifacts_dir=str(artifacts_dir),
        tracking_uri=tracking_uri,
        retention_days=retention_days,
        now=now,
        entries=sorted([*trains, *pretrains], key=lambda entry: entry.created),
    )


def plan_model(
    artifacts_dir: str | Path,
    stage: str,
    digest: str,
    retention_days: int,
    now: datetime,
    context: dict[str, Any],
    client: mlflow.MlflowClient | None,
    staying: list[ModelEntry] = (),
) -> ModelEntry:
    """One model stage's entry: what holds it (alias, export, a kept train built on it, youth,
    a live run), else `remove` with the stages built from it and its versions."""
    created = model_created(context["manifests"][(stage, digest)])
    expires = expires_at(created, retention_days)
    versions = context["versions"].get(digest, []) if stage == "train" else []
    exports = context["exports"].get(digest, []) if stage == "train" else []
    reasons = holders(
        (f"{alias} ({v.uri})" for v in versions for alias in v.aliases),
        (v.exported for v in versions),
        exports,
    )
    reasons += [
        f"base of kept train {entry.digest}" for entry in staying if names_stage(entry, stage, digest)
    ]
    if now < expires:
        reasons.append(f"young (expires {expires.date().isoformat()})")
    group = [(stage, digest), *downstream((stage, digest), context["children"])]
    busy = [f"{s} {d}" for s, d in group if not lock_free(artifacts_dir, s, d)] + context["writers"][stage]
    if busy:
        reasons.append("in use (a run holds or writes " + ", ".join(busy) + ")")
    items = [
        StageItem(stage=s, digest=d, path=str(stage_dir(artifacts_dir, s, d)),
                  bytes=folder_bytes(stage_dir(artifacts_dir, s, d)))
        for s, d in group[1:]
    ]  # fmt: skip
    size = folder_bytes(stage_dir(artifacts_dir, stage, digest)) + sum(item.bytes for item in items)
    size += sum(logged_model_bytes(client, v) for v in versions)
    expired = f"expired {expires.date().isoformat()}: no alias, not exported, not in use"
    return ModelEntry(
        stage=stage,
        digest=digest,
        path=str(stage_dir(artifacts_dir, stage, digest)),
        created=created,
        expires=expires,
        action="keep" if reasons else "remove",
        reasons=reasons or [expired],
        bytes=size,
        stages=items,
        versions=[v.uri for v in versions],
    )


def names_stage(entry: ModelEntry, stage: str, digest: str) -> bool:
    """Whether a train stage was built on this stage: its manifest's inputs name it, or its
    adapter's base path (or stats, model config) points into its folder."""
    folder = Path(entry.path)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if any((i["stage"], i["digest"]) == (stage, digest) for i in manifest.get("inputs") or []):
        return True
    needle = f"stages/{stage}/{digest}"
    return any(
        needle in (folder / name).read_text(encoding="utf-8", errors="replace")
        for name in REFERENCE_FILES
        if (folder / name).is_file()
    )


def logged_model_folder(client: mlflow.MlflowClient | None, version: Version) -> Path | None:
    """The local folder of the logged model a version was registered from, if it lies on disk."""
    if client is None or not (version.source or "").startswith("models:/m-"):
        return None
    try:
        location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    except MlflowException:
        return None
    folder = Path(location.removeprefix("file://"))
    return folder if "://" not in location.removeprefix("file://") and folder.is_dir() else None


def logged_model_bytes(client: mlflow.MlflowClient | None, version: Version) -> int:
    folder = logged_model_folder(client, version)
    return folder_bytes(folder) if folder else 0


def apply_retention(plan: RetentionPlan, dry_run: bool = False) -> RetentionReport:
    """Remove what the plan marks `remove` (with `dry_run`, nothing) and report what went, what
    stayed and why, and the bytes freed. Each removal re-checks its locks and aliases first: a
    run or an alias that appeared since the plan keeps the model."""
    if dry_run:
        return report(plan, dry_run=True, entries=plan.entries, cleared=0)
    cleared = len(remove_stale_temporaries(plan.artifacts_dir))
    client = open_client(plan.tracking_uri)
    entries = [
        remove_model(plan, entry, client) if entry.action == "remove" else entry for entry in plan.entries
    ]
    return report(plan, dry_run=False, entries=entries, cleared=cleared)


def report(plan: RetentionPlan, dry_run: bool, entries: list[ModelEntry], cleared: int) -> RetentionReport:
    removed = [entry for entry in entries if entry.action == "remove"]
    return RetentionReport(
        dry_run=dry_run,
        now=plan.now,
        retention_days=plan.retention_days,
        removed=removed,
        kept=[entry for entry in entries if entry.action == "keep"],
        bytes_freed=sum(entry.bytes for entry in removed),
        versions_deleted=[uri for entry in removed for uri in entry.versions],
        temporaries_cleared=cleared,
    )


@contextmanager
def held_locks(artifacts_dir: str | Path, group: list[tuple[str, str]]) -> Iterator[list[str]]:
    """Hold the stage locks of the group while removing it; yields the stages a live run holds
    (nothing is held then)."""
    with ExitStack() as stack:
        for stage, digest in group:
            lock = _stage_file_lock(artifacts_dir, stage, digest)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                stack.close()
                yield [f"{stage} {digest}"]
                return
            stack.callback(lock.release)
        yield []


def remove_model(plan: RetentionPlan, entry: ModelEntry, client: mlflow.MlflowClient | None) -> ModelEntry:
    """Remove one model stage, its MLflow versions and the stages built from it; the entry as
    it ended (kept, with the reason, when a run or an alias took it since the plan)."""
    group = [*((item.stage, item.digest) for item in entry.stages), (entry.stage, entry.digest)]
    with held_locks(plan.artifacts_dir, group) as busy:
        busy = busy or live_writers(plan.artifacts_dir, entry.stage)
        if busy:
            return entry.model_copy(update={"action": "keep", "reasons": [f"in use (a run holds {busy[0]})"]})
        if entry.stage == "train":
            kept_by = remove_versions(plan, entry, client)
            if kept_by:
                return entry.model_copy(update={"action": "keep", "reasons": kept_by})
        remote = bound_store(plan.artifacts_dir)
        for stage, digest in group:  # the stages built from the model first, the model last
            if remote:  # gone for every machine first, then this machine's copy
                remote.remove_stage(stage, digest)
            trash(stage_dir(plan.artifacts_dir, stage, digest))
    return entry


def remove_versions(plan: RetentionPlan, entry: ModelEntry, client: mlflow.MlflowClient | None) -> list[str]:
    """Delete the train stage's versions and their logged models' files, and tag their runs
    `tuneline.removed`; under each model name's registry lock, so a registration deciding aliases
    meanwhile is waited for. Returns the holders found instead (an alias or export since the plan)."""
    if client is None:  # no registry: only an export listed since the plan can hold it
        return holders((), (), read_exports(plan.artifacts_dir).get(entry.digest, []))
    versions = registered_versions(client).get(entry.digest, [])
    names = sorted({version.name for version in versions})
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(registry_lock(plan.tracking_uri, plan.artifacts_dir, name))
        versions = registered_versions(client).get(entry.digest, [])
        exports = read_exports(plan.artifacts_dir).get(entry.digest, [])
        kept_by = holders((a for v in versions for a in v.aliases), (v.exported for v in versions), exports)
        if kept_by:
            return kept_by
        note = f"{plan.now.date().isoformat()}: retention removed {entry.stage} stage {entry.digest}"
        for run_id in run_ids(entry, versions):
            with suppress(MlflowException):  # a run deleted by hand
                client.set_tag(run_id, REMOVED_TAG, note)
        for version in versions:
            folder = logged_model_folder(client, version)
            client.delete_model_version(version.name, version.version)
            delete_logged_model(client, version, folder)
    return []


def run_ids(entry: ModelEntry, versions: list[Version]) -> list[str]:
    """The MLflow runs of a train stage: the one it opened and those its versions came from."""
    stats_path = Path(entry.path) / STATS
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    found = [stats.get("mlflow_run_id"), *(version.run_id for version in versions)]
    return list(dict.fromkeys(run_id for run_id in found if run_id))


def delete_logged_model(client: mlflow.MlflowClient, version: Version, folder: Path | None) -> None:
    """Delete the logged model behind a deleted version, and its files when they lie on disk,
    unless another version still uses it."""
    if not (version.source or "").startswith("models:/m-"):
        return
    others = client.search_model_versions(f"name = '{version.name}'")
    if any(other.source == version.source for other in others):
        return
    with suppress(MlflowException):  # deleted already by an interrupted earlier removal
        client.delete_logged_model(version.source.removeprefix("models:/"))
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def trash(folder: Path) -> None:
    """Remove a stage folder: renamed to a `.tmp-` name first (gone for readers at once; what a
    crash leaves is a temporary that remove_stale_temporaries deletes), then deleted."""
    if not folder.exists():
        return
    tmp = folder.with_name(f"{TMP_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
