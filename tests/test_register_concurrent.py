"""Two processes register two different trained models into one model name at the same moment.

The registry decides once per version, one registration after the other: two versions, one
champion, and each stage's stats (what its run prints) agree with the registry: the first to
decide found no champion, the second compared against the first.
"""

import json
import subprocess
import sys
import time

import mlflow
from register_fixtures import MODEL_NAME, make_store, start_child, trained_and_evaluated

from tuneline.experiment import open_experiment


def test_two_registrations_at_once_decide_one_after_the_other(tmp_path):
    recipe, store, _ = make_store(tmp_path)
    trained_and_evaluated(store, "a", 0.5)
    trained_and_evaluated(store, "b", 0.8)  # beats a by more than the margin (0.05)
    open_experiment(recipe.register.tracking_uri, recipe.register.experiment, store)  # store made once
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    children = {name: start_child(tmp_path, name, wait_for=ready) for name in ("a", "b")}
    stats = {}
    for name, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        stats[name] = json.loads(stdout.strip().splitlines()[-1])

    client = mlflow.MlflowClient(recipe.register.tracking_uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))
    assert versions == ["1", "2"] and {stats["a"]["version"], stats["b"]["version"]} == {"1", "2"}
    first, second = sorted(stats.values(), key=lambda s: s["champion_version_before"] is not None)
    assert second["champion_version_before"] == first["version"], "both decided against no champion"
    assert first["reason"] == "no champion yet" and first["aliases"][-1] == "champion"
    # b becomes champion whichever decided first: first, or by beating a.
    assert stats["b"]["promoted"] is True and "champion" in stats["b"]["aliases"]
    assert stats["a"]["promoted"] is (first is stats["a"])
    aliases = {alias: str(v) for alias, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    assert aliases == {"champion": stats["b"]["version"], "candidate": "2"}
    for side in stats.values():  # what each stage says it did is what the version records
        tags = client.get_model_version(MODEL_NAME, side["version"]).tags
        assert tags["tuneline.aliases"] == ",".join(side["aliases"])
        assert tags["tuneline.promoted"] == str(side["promoted"]).lower()
        assert client.get_run(side["run_id"]).info.status == "FINISHED"


def test_two_processes_open_a_new_sqlite_store_at_once(tmp_path):
    """Both get the one experiment; without the lock one dies in MLflow's table migrations."""
    script = (
        "import sys, time\n"
        "from tuneline.experiment import open_experiment\n"
        "import mlflow\n"  # imported before the start line, so both open the store together
        "while time.time() < float(sys.argv[1]): time.sleep(0.01)\n"
        f"print(open_experiment('sqlite:///{tmp_path}/m.db', 'tuneline', {str(tmp_path)!r}))\n"
    )
    start = str(time.time() + 8)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert len({stdout.strip().splitlines()[-1] for stdout, _ in results}) == 1
