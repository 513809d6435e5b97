"""A register stage killed with SIGKILL (as `kill -9` does) is completed by the next run: the same
version gets its tags and aliases, the MLflow run ends FINISHED, and no second version appears.

The child process dies right after MLflow created the version (the moment it prints "Created
version"), or right after it moved the `champion` alias, before the stage could record that.
"""

import mlflow
import pytest
from register_fixtures import MODEL_NAME, make_store, start_child, trained_and_evaluated

from tuneline.register.stage import run_register
from tuneline.store import read_stats


@pytest.mark.parametrize("kill", ["version", "champion"])
def test_a_killed_registration_is_completed_not_repeated(tmp_path, kill):
    recipe, store, splits = make_store(tmp_path)
    trained, evaluated = trained_and_evaluated(store, "a", 0.5)
    child = start_child(tmp_path, "a", kill)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -9, stderr[-3000:]
    client = mlflow.MlflowClient(recipe.register.tracking_uri)
    (orphan,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    if kill == "version":  # the run logs the model and registers it, and ends after both
        assert client.get_run(orphan.run_id).info.status == "RUNNING"

    ref = run_register(store, recipe, splits, trained, evaluated)
    stats = read_stats(ref)

    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"], "the re-run made another version"
    assert stats["version"] == "1" and stats["run_id"] == orphan.run_id
    assert stats["promoted"] is True and stats["reason"] == "no champion yet"
    assert stats["aliases"] == ["candidate", "champion"]
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {"candidate": "1", "champion": "1"}
    tags = client.get_model_version(MODEL_NAME, "1").tags
    assert tags["tuneline.stage_digest"] == ref.digest and tags["tuneline.promoted"] == "true"
    assert tags["tuneline.aliases"] == "candidate,champion"
    run = client.get_run(orphan.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]  # not twice
    experiment_id = run.info.experiment_id
    assert len(mlflow.search_logged_models([experiment_id], output_format="list")) == 1  # reused
