"""The registry side of the register stage: one version per register stage, and one decision.

A version is created with its stage digest as a tag in the same call, so a re-run after a kill
finds and completes its own version instead of making another. The decision (read the champion,
compare, move the aliases) runs under a lock per registered model name, so two runs registering
into one name at once decide one after the other, each against the champion the other left. The
decision is written on the version before the aliases move, and `tuneline.aliases` (the aliases
this registration set) last: a version with that tag is finished.

The lock is a file lock. For a SQLite store it lies beside the database, so it serializes every
process on this machine that writes to it; for a tracking server it lies in the project's
artifacts folder and serializes only the runs of that folder. MLflow has no compare-and-set on
aliases, so runs on several machines registering into one name at once can still interleave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
import tuneline.experiment  # noqa: F401

# isort: split
import mlflow
from mlflow.exceptions import MlflowException

from tuneline.register.guardrails import Check

CANDIDATE = "candidate"
CHAMPION = "champion"
DIGEST_TAG = "tuneline.stage_digest"
ALIASES_TAG = "tuneline.aliases"
LOWER_IS_BETTER = {"loss"}
TAG_LIMIT = 5000  # characters MLflow keeps in a tag value
LOCK_TIMEOUT_S = 600  # the decision takes a few store calls; this long means a run is stuck


class RegistryBusy(RuntimeError):
    """Another registration into the same model name held the registry lock too long."""


@dataclass(frozen=True)
class Decision:
    """What one registration decided and did: `aliases` are the aliases it set on its version."""

    promoted: bool
    reason: str
    champion_before: str | None
    champion_metric_before: float | None
    aliases: tuple[str, ...] = ()


def lock_path(tracking_uri: str, artifacts_dir: str | Path, model_name: str) -> Path:
    """The lock file of one registered model name in one tracking store (see the module doc)."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        folder, store = database.parent / "locks", str(database)
    else:
        folder, store = Path(artifacts_dir).resolve() / "locks", tracking_uri
    key = hashlib.sha256(f"{store}\n{model_name}".encode()).hexdigest()[:16]
    return folder / f"register-{key}.lock"


def registry_lock(tracking_uri: str, artifacts_dir: str | Path, model_name: str) -> FileLock:
    """The lock to hold while creating a version of `model_name` and deciding its aliases."""
    path = lock_path(tracking_uri, artifacts_dir, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, timeout=LOCK_TIMEOUT_S)


def acquire(lock: FileLock, model_name: str) -> FileLock:
    """Take the lock or say who holds it up (a killed process frees its lock at once)."""
    try:
        lock.acquire()
    except Timeout as error:
        raise RegistryBusy(
            f"register: another run has been registering into {model_name!r} for more than "
            f"{LOCK_TIMEOUT_S} s (lock {lock.lock_file}); let it finish, then run again"
        ) from error
    return lock


def find_version(client: mlflow.MlflowClient, model_name: str, digest: str) -> str | None:
    """The version an earlier attempt of this register stage created, or None."""
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return str(min(int(version.version) for version in found)) if found else None


def create_version(model_uri: str, model_name: str, tags: dict[str, str]) -> str:
    """A new version of `model_name` (registered on first use) carrying `tags` from its creation."""
    return str(mlflow.register_model(model_uri, model_name, tags=tags).version)


def champion_version(client: mlflow.MlflowClient, model_name: str) -> str | None:
    """The version holding the `champion` alias, or None (also when the model is not registered yet)."""
    return alias_version(client, model_name, CHAMPION)


def alias_version(client: mlflow.MlflowClient, model_name: str, alias: str) -> str | None:
    """The version an alias points at, or None."""
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = registered.aliases.get(alias)  # an int in MLflow 3, a string elsewhere
    return None if version is None else str(version)


def champion_metric(
    client: mlflow.MlflowClient, model_name: str, champion: str | None, metric: str
) -> float | None:
    """The champion's metric, read from the run that logged the champion version."""
    if champion is None:
        return None
    run_id = client.get_model_version(model_name, champion).run_id
    return client.get_run(run_id).data.metrics.get(metric) if run_id else None


def decide_promotion(
    metric: str, candidate: float | None, champion: float | None, margin: float, champion_ver: str | None
) -> tuple[bool, str]:
    """Whether the candidate takes `champion`, and why. Higher is better except for loss."""
    if champion_ver is None:
        return True, "no champion yet"
    if candidate is None:
        return False, f"the candidate has no tuned_{metric} (evaluation gave no finite value)"
    if champion is None:
        return False, f"champion version {champion_ver} has no tuned_{metric}; move the alias by hand"
    gain = champion - candidate if metric in LOWER_IS_BETTER else candidate - champion
    beats = gain - margin > 1e-9  # 0.55 - 0.5 is 0.05000000000000004: not *more* than a 0.05 margin
    verdict = "beats" if beats else "does not beat"
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    return beats, (
        f"tuned_{metric} {candidate:.4g} vs champion v{champion_ver} {champion:.4g} ({direction} is better): "
        f"{verdict} it by more than the margin {margin:g}"
    )


def settle_version(
    client: mlflow.MlflowClient,
    model_name: str,
    version: str,
    promote_metric: str,
    candidate: float | None,
    margin: float,
    rescored: tuple[str, float | None] | None = None,
    checks: Sequence[Check] = (),
) -> Decision:
    """Decide and apply the aliases of `version` once; call it holding the registry lock. A version
    finished earlier gives back its recorded decision; one whose champion alias an interrupted
    attempt already moved keeps that decision and is completed.

    `rescored` is (champion version, its metric) as the evaluate stage measured it on this run's
    test split: used while that version is still the champion, else the champion's own logged
    metric. A failed guardrail in `checks` refuses a promotion the metric would allow."""
    tags = client.get_model_version(model_name, version).tags
    if ALIASES_TAG in tags:
        return recorded_decision(tags)
    champion = champion_version(client, model_name)
    if champion == version and "tuneline.promoted" in tags:
        decision = recorded_decision(tags)
    else:
        if rescored is not None and rescored[0] == champion:
            before, where = rescored[1], "; both scored on this run's test split"
        else:
            before = champion_metric(client, model_name, champion, f"tuned_{promote_metric}")
            where = "; the champion's figure is from its own run's test split" if champion else ""
        promoted, reason = decide_promotion(promote_metric, candidate, before, margin, champion)
        promoted, reason = apply_guardrails(promoted, reason + where, checks)
        decision = Decision(promoted, reason, champion, before)
        record_decision(client, model_name, version, decision, promote_metric, checks)
    aliases = apply_aliases(client, model_name, version, decision.promoted)
    client.set_model_version_tag(model_name, version, ALIASES_TAG, ",".join(aliases))
    return Decision(decision.promoted, decision.reason, decision.champion_before,
                    decision.champion_metric_before, aliases)  # fmt: skip


def apply_guardrails(promoted: bool, reason: str, checks: Sequence[Check]) -> tuple[bool, str]:
    """The decision after the guardrails: any failed check refuses, and is named in the reason."""
    failed = "; ".join(check.line() for check in checks if not check.passed)
    if not failed:
        return promoted, reason
    return False, f"{reason}; {'promotion refused by guardrails' if promoted else 'guardrails'}: {failed}"


def record_decision(
    client: mlflow.MlflowClient,
    model_name: str,
    version: str,
    decision: Decision,
    promote_metric: str,
    checks: Sequence[Check] = (),
) -> None:
    """Write the decision (and every guardrail's verdict) on the version before any alias moves;
    `tuneline.promoted` goes last."""
    if checks:
        client.set_model_version_tag(
            model_name, version, "tuneline.guardrails", "; ".join(c.line() for c in checks)[:TAG_LIMIT]
        )
    tags = {
        "tuneline.metric": f"tuned_{promote_metric}",
        "tuneline.reason": decision.reason[:TAG_LIMIT],
        "tuneline.champion_before": decision.champion_before or "",
        "tuneline.champion_metric_before": "" if decision.champion_metric_before is None
        else repr(decision.champion_metric_before),
        "tuneline.promoted": str(decision.promoted).lower(),
    }  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def recorded_decision(tags: dict[str, str]) -> Decision:
    """The decision written on a version by `record_decision` (and its aliases, once set)."""
    before = tags.get("tuneline.champion_metric_before")
    return Decision(
        promoted=tags["tuneline.promoted"] == "true",
        reason=tags["tuneline.reason"],
        champion_before=tags.get("tuneline.champion_before") or None,
        champion_metric_before=float(before) if before else None,
        aliases=tuple(alias for alias in tags.get(ALIASES_TAG, "").split(",") if alias),
    )


def apply_aliases(
    client: mlflow.MlflowClient, model_name: str, version: str, promoted: bool
) -> tuple[str, ...]:
    """Point `candidate` at the version unless a newer version holds it (runs that finish out of
    order), and `champion` when promoted. Returns the aliases set."""
    aliases = []
    holder = alias_version(client, model_name, CANDIDATE)
    if holder is None or int(holder) <= int(version):
        client.set_registered_model_alias(model_name, CANDIDATE, version)
        aliases.append(CANDIDATE)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        aliases.append(CHAMPION)
    return tuple(aliases)
