"""Stages on an S3 object store (moto's S3 server on loopback): the manifest is the commit.

Two "machines" are two local folders bound to one bucket prefix: a stage one writes is read by the
other from the store, a write killed half-way leaves nothing that exists, large files go up in
multipart uploads, a changed object is refused, and a whole run's stages and MLflow artifacts
land in the store so that a second machine reuses every stage.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import s3_server  # noqa: F401  (fixture)

from tuneline.errors import UserError
from tuneline.objectstore import ObjectStoreError, bound_store, open_artifacts
from tuneline.recipe import RecipeError, load_recipe
from tuneline.store import Stage, find_stage, iter_records, reuse_or_write, verify_stage

STAGE = Stage("clean", entry="tuneline.curate.clean", code=())


def write_records(writer, records):
    for record in records:
        writer.count_in()
        writer.keep(record)


@pytest.fixture
def store_url(s3_server):  # noqa: F811
    return f"s3://{s3_server.bucket()}/team/project"


def machine(tmp_path, name, url) -> Path:
    """A machine's local artifacts folder, bound to the store as a run binds it."""
    return open_artifacts(url, str(tmp_path / name))


def keys(s3_server, url):  # noqa: F811
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix + "/") for item in listing.get("Contents", []))


def test_a_stage_written_on_one_machine_is_read_on_another(tmp_path, s3_server, store_url):  # noqa: F811
    first, second = machine(tmp_path, "a", store_url), machine(tmp_path, "b", store_url)
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    written = reuse_or_write(first, STAGE, "d1", lambda writer: write_records(writer, records))

    stored = keys(s3_server, store_url)
    manifest = json.loads(Path(written.file("manifest.json")).read_text())
    attempt = manifest["attempt"]
    assert stored == sorted(
        ["stages/clean/d1/manifest.json"]
        + [f"stages/clean/d1/{attempt}/{name}" for name in ("records.jsonl", "rejects.jsonl", "stats.json")]
    )

    read = find_stage(second, "clean", "d1")
    assert read is not None and Path(read.path).is_relative_to(second)
    assert list(iter_records(read)) == records
    verify_stage(read)  # every file matches the manifest's sha256
    # The second machine reuses it through the store: nothing is written again.
    again = reuse_or_write(second, STAGE, "d1", lambda writer: pytest.fail("the stage was written again"))
    assert again == read and keys(s3_server, store_url) == stored


def test_a_write_killed_half_way_leaves_nothing_a_later_stage_reads(tmp_path, s3_server, store_url):  # noqa: F811
    first = machine(tmp_path, "a", store_url)
    started = tmp_path / "uploading"
    script = f"""
import sys, time
from pathlib import Path
from tuneline import objectstore
from tuneline.store import Stage, reuse_or_write
store = objectstore.bound_store({str(first)!r})
put = store.fs.put_file
def slow_put(local, remote, **kwargs):
    put(local, remote, **kwargs)
    if remote.endswith("records.jsonl"):
        Path({str(started)!r}).touch()
        time.sleep(600)  # killed here, the rest of the stage not uploaded yet
store.fs.put_file = slow_put
def write(writer):
    for i in range(3):
        writer.count_in()
        writer.keep({{"instruction": "q", "output": str(i)}})
reuse_or_write({str(first)!r}, Stage("clean", "tuneline.curate.clean", ()), "d2", write)
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the writer never reached its upload"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert any(key.endswith("/records.jsonl") for key in keys(s3_server, store_url))  # half uploaded
    assert "stages/clean/d2/manifest.json" not in keys(s3_server, store_url)
    second = machine(tmp_path, "b", store_url)
    assert find_stage(second, "clean", "d2") is None  # no manifest: the stage does not exist
    assert find_stage(first, "clean", "d2") is None  # not on the killed writer's disk either

    records = [{"instruction": "q", "output": "again"}]
    reuse_or_write(first, STAGE, "d2", lambda writer: write_records(writer, records))
    assert list(iter_records(find_stage(second, "clean", "d2"))) == records


def test_large_files_go_up_in_parts_and_a_changed_object_is_refused(tmp_path, s3_server, store_url):  # noqa: F811
    first, second = machine(tmp_path, "a", store_url), machine(tmp_path, "b", store_url)
    payload = os.urandom(1 << 20) * 40  # 40 MiB: parts of 16 MiB

    def write(writer):
        writer.path("model.bin").write_bytes(payload)

    written = reuse_or_write(first, STAGE, "d3", write)
    attempt = json.loads(Path(written.file("manifest.json")).read_text())["attempt"]
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key=f"{prefix}/stages/clean/d3/{attempt}/model.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts

    changed = f"{prefix}/stages/clean/d3/{attempt}/stats.json"
    client.put_object(Bucket=bucket, Key=changed, Body=b'{"rows": 1}')
    with pytest.raises(ObjectStoreError, match="sha256 differs") as error:
        find_stage(second, "clean", "d3")
    assert f"{store_url}/stages/clean/d3/" in str(error.value)
    assert not (second / "stages" / "clean" / "d3" / "manifest.json").exists()


def test_one_local_folder_serves_one_store(tmp_path, s3_server):  # noqa: F811
    first_url, other_url = (f"s3://{s3_server.bucket()}/p" for _ in range(2))
    folder = machine(tmp_path, "a", first_url)
    assert bound_store(folder).url == first_url
    with pytest.raises(UserError, match=f"holds the stages of {first_url}"):
        open_artifacts(other_url, str(folder))


def test_a_missing_bucket_an_unreachable_store_and_credentials_in_the_url_are_clear_errors(
    tmp_path,
    s3_server,  # noqa: F811
    monkeypatch,
):
    with pytest.raises(
        ObjectStoreError, match="the bucket 'no-such-bucket' of s3://no-such-bucket/p does not"
    ):
        open_artifacts("s3://no-such-bucket/p", str(tmp_path / "a"))
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        env.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(ObjectStoreError, match="cannot reach s3://any-bucket/p: EndpointConnectionError"):
            open_artifacts("s3://any-bucket/p", str(tmp_path / "b"))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe, ["artifacts_dir=s3://key:secret@bucket/p"])
    message = str(error.value)
    assert "artifacts_dir" in message and "has credentials in it" in message and "secret" not in message
    with pytest.raises(RecipeError, match="give its path \\(/mnt/shared\\), not a URL"):
        load_recipe(recipe, ["artifacts_dir=file:///mnt/shared"])


@pytest.mark.slow
def test_a_whole_run_commits_to_the_store_and_another_machine_reuses_it(tmp_path, s3_server, prefect_server):  # noqa: F811
    """The finetune flow with artifacts_dir on S3: every stage and the MLflow model are in the
    bucket; a second machine (another local_dir, the same tracking store) reuses every stage."""
    from train_fixtures import small_project
    from tuneline.flows.finetune import finetune

    url = f"s3://{s3_server.bucket()}/runs"
    train = {"max_steps": 2, "batch_size": 16, "max_length": 96, "lora": {"r": 4, "alpha": 8}}
    register = {"model_name": "s3-test", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    small_project(tmp_path, "s3-test", artifacts_dir=url, train=train, register=register)

    first = finetune(load_recipe(tmp_path / "recipe.yaml", [f"local_dir={tmp_path / 'a'}"]))
    stored = keys(s3_server, url)
    committed = {
        key.split("/")[1] for key in stored if key.startswith("stages/") and key.endswith("manifest.json")
    }
    assert {"fetch", "collect", "clean", "gate", "split", "train", "evaluate", "register"} <= committed
    assert any(key.startswith("mlartifacts/") and key.endswith("model.safetensors") for key in stored)

    second = finetune(load_recipe(tmp_path / "recipe.yaml", [f"local_dir={tmp_path / 'b'}"]))
    digests = {stage: Path(path).name for stage, path in first["stage_dirs"].items()}
    assert {stage: Path(path).name for stage, path in second["stage_dirs"].items()} == digests
    # Nothing was computed again: the store holds exactly what the first machine committed (a stage
    # written again would add an attempt and rewrite its manifest). The report's `reused` compares
    # whole seconds, so a stage the first run finished in the second the second run started at
    # would not be listed there.
    assert keys(s3_server, url) == stored
    assert second["registry"]["version"] == first["registry"]["version"]
    assert all(Path(path).is_relative_to(tmp_path / "b") for path in second["stage_dirs"].values())
    for path in second["stage_dirs"].values():  # copied from the store: the first machine's manifests
        assert json.loads((Path(path) / "manifest.json").read_text())["attempt"] in " ".join(stored)


@pytest.mark.slow
def test_a_training_resumes_on_another_machine_from_the_uploaded_checkpoint(
    tmp_path,
    s3_server,  # noqa: F811
    store_url,
    monkeypatch,
):
    """Checkpoints go to local disk and are uploaded when due: a training that dies after its
    checkpoint at step 2 resumes on another machine (another local folder) from that step."""
    from train_fixtures import make_split_and_model, small_spec

    from tuneline.train import stage as train
    from tuneline.train import tracking

    machine(tmp_path, "art", store_url)  # make_split_and_model writes the split into <tmp>/art
    splits, model = make_split_and_model(tmp_path)
    spec = small_spec(max_steps=4, save_steps=2)
    original = tracking.TrackingCallback.on_step_end

    def die_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("the machine died")
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(tracking.TrackingCallback, "on_step_end", die_at_step_3)
    with pytest.raises(RuntimeError, match="the machine died"):
        train.run_train(tmp_path / "art", splits, model, spec)
    monkeypatch.setattr(tracking.TrackingCallback, "on_step_end", original)
    uploaded = [key for key in keys(s3_server, store_url) if key.startswith("checkpoints/train/")]
    assert any(key.endswith("checkpoint-2/trainer_state.json") for key in uploaded), uploaded

    other = machine(tmp_path, "other", store_url)
    ref = train.run_train(other, find_stage(other, "split", splits.digest), model, spec)
    stats = json.loads(ref.file("stats.json").read_text())
    assert stats["resumed_from_step"] == 2 and stats["steps_run"] == 2
    assert not [key for key in keys(s3_server, store_url) if key.startswith("checkpoints/")]  # done with
    assert find_stage(machine(tmp_path, "third", store_url), "train", ref.digest) is not None


def test_retention_on_another_machine_removes_expired_models_from_the_store(tmp_path, s3_server, store_url):  # noqa: F811
    """The store is the truth: retention run on a machine without local copies plans from the
    store's manifests and removes the expired model and its evaluation there, for every machine."""
    from datetime import UTC, datetime, timedelta

    from register_fixtures import TRAIN_STATS

    from tuneline.register.retention import apply_retention, plan_retention
    from tuneline.store import write_stage

    first, second = machine(tmp_path, "a", store_url), machine(tmp_path, "b", store_url)

    def stage(name, digest, stats, inputs=()):
        with write_stage(first, name, digest, list(inputs)) as writer:
            writer.stats = stats
        return find_stage(first, name, digest)

    splits = stage("split", "s1", {})
    trained = stage("train", "t-old", {**TRAIN_STATS, "mlflow_run_id": "gone"}, [splits])
    stage("evaluate", "e-old", {}, [splits, trained])
    later = datetime.now(UTC) + timedelta(days=30)
    plan = plan_retention(second, f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", 15, later)
    report = apply_retention(plan)

    assert [entry.digest for entry in report.removed] == ["t-old"]
    stored = keys(s3_server, store_url)
    assert not any(key.startswith(("stages/train/", "stages/evaluate/")) for key in stored), stored
    assert "stages/split/s1/manifest.json" in stored  # data stages are never touched
    bound_store(first).committed.clear()  # machine a, in a later process
    assert find_stage(first, "train", "t-old") is None  # its local copy no longer counts
    assert find_stage(first, "split", "s1") is not None
