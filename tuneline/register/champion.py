"""The champion's model, found before evaluation so it is scored on this run's test split.

A champion's own metric was measured on the test split of the run that registered it; after the
data changed that split is another set, and comparing the two numbers says little. So the
evaluate stage scores the champion again beside base and tuned, and the register stage compares
on those scores. The champion's model is its train stage's folder when this artifacts folder
still holds it (found by the version's `tuneline.train_digest` tag), else the version's model
downloaded once from MLflow into `<artifacts_dir>/cache/champions/`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

# tuneline.experiment turns MLflow's telemetry and progress bars off: imported before mlflow.
import tuneline.experiment  # noqa: F401

# isort: split
import mlflow

from tuneline.evaluate.stage import Champion
from tuneline.models import trained_folder
from tuneline.recipe import ModelSpec, RegisterSpec
from tuneline.register.registry import champion_version
from tuneline.store import StageRef, find_stage

TRAIN_DIGEST_TAG = "tuneline.train_digest"


def champion_model(artifacts_dir: str | Path, register: RegisterSpec, trained: StageRef) -> Champion | None:
    """The registered model's champion (version, train digest, model), or None when there is
    none, or when it is the model this run trained (nothing to compare)."""
    if not store_exists(register.tracking_uri):
        return None  # never create a tracking database just to find it empty
    mlflow.set_tracking_uri(register.tracking_uri)
    client = mlflow.MlflowClient()
    version = champion_version(client, register.model_name)
    if version is None:
        return None
    train_digest = client.get_model_version(register.model_name, version).tags.get(TRAIN_DIGEST_TAG)
    if train_digest == trained.digest:
        return None
    stage = find_stage(artifacts_dir, "train", train_digest) if train_digest else None
    if stage is not None:
        folder = trained_folder(stage.dir)
    else:
        folder = downloaded_model(artifacts_dir, register.model_name, version)
    return Champion(version, train_digest, ModelSpec(name=str(folder)))


def store_exists(tracking_uri: str) -> bool:
    """Whether the tracking store can hold a registered model: a SQLite file must exist."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    return True


def downloaded_model(artifacts_dir: str | Path, model_name: str, version: str) -> Path:
    """The model folder of a registered version, downloaded once (whole, or not at all)."""
    target = Path(artifacts_dir) / "cache" / "champions" / model_name / f"v{version}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(scratch))
            scratch.rename(target)
        except OSError:
            if not target.is_dir():  # another run finished the same download first: keep theirs
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target / "artifacts" / "model"
