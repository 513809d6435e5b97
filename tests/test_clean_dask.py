"""clean.executor: dask: shards cleaned on a Dask cluster give the local executor's stage exactly.

Dedup stays global across shards (exact ids, MinHash buckets decided on the driver), every shard's
ledger adds up to the stage's, the executor does not change the stage digest, and an unreachable
scheduler is a clear error naming clean.dask_address.
"""

from __future__ import annotations

import json
import random
import socket

import numpy as np
import pytest

from tuneline.curate.clean import run_clean
from tuneline.curate.dedup import NearDedup
from tuneline.curate.shards import SPOOL, DaskAddressError, finish_stats, near_duplicates
from tuneline.recipe import CleanSpec, Recipe
from tuneline.records import make_record
from tuneline.store import LedgerError, find_stage, read_manifest, read_stats, write_stage

STORY = (
    "the quick brown fox jumps over the lazy dog near the river bank on a sunny day in june "
    "while the farmer counts his sheep and the baker sells bread to the children of the village"
)


def conv(question: str, answer: str) -> dict:
    return make_record([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def collected_stage(tmp_path):
    """32 records in shards of 4: near and exact duplicates whose first copy is in another shard,
    filter drops, PII, and distinct records."""
    words = STORY.split()
    records = [
        conv(f"question {i} about topic {i * 7}", f"distinct answer number {i} " * 3) for i in range(24)
    ]
    records[1] = conv("tell me the story", STORY)
    records[9] = conv("tell me the story", STORY.replace("sunny", "rainy"))  # near, shard 2
    records[14] = conv("tell me the story", " ".join(words[:-1]) + " town")  # near, shard 3
    records[5] = conv("write to me", "mail me at bob@mailhost.io please")
    records[21] = records[5]  # exact duplicate, shard 5
    records[3] = conv("empty answer", "   ")
    records[17] = conv("q", "a")  # kept: a one-letter answer is a label
    records += [records[2], conv("another one", "x"), conv("last", STORY + " and that is all"), records[9]]
    records += [conv("and", "."), conv("more", "text here"), conv("hi", "hello there"), conv("a", "b c")]
    with write_stage(tmp_path, "collect", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    return find_stage(tmp_path, "collect", "in")


def stage_files(ref) -> dict[str, str]:
    return {name: ref.file(name).read_text() for name in ("records.jsonl", "rejects.jsonl")}


def dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_dask_shards_give_the_local_stage_byte_for_byte_with_global_dedup(tmp_path):
    collected = collected_stage(tmp_path / "in")
    local = run_clean(tmp_path / "local", collected, CleanSpec(batch_size=4, workers=1))
    dask = run_clean(tmp_path / "dask", collected, CleanSpec(batch_size=4, workers=2, executor="dask"))
    assert stage_files(dask) == stage_files(local)
    assert read_stats(dask) == read_stats(local)
    assert read_manifest(dask)["ledger"] == read_manifest(local)["ledger"]
    ledger = read_manifest(dask)["ledger"]
    assert ledger["dropped"]["near_duplicate"] >= 3 and ledger["dropped"]["duplicate"] >= 2
    shards = read_stats(dask)["shards"]
    assert len(shards) == 8
    # the copies sit in later shards than their first occurrence (shard 0): dedup is global
    assert [i for i, s in enumerate(shards) if s["dropped"].get("near_duplicate")][0] >= 2
    assert [i for i, s in enumerate(shards) if s["dropped"].get("duplicate")][0] >= 5
    for shard in shards:
        assert shard["in"] == shard["out"] + sum(shard["dropped"].values())
    assert sum(s["in"] for s in shards) == ledger["in"] and sum(s["out"] for s in shards) == ledger["out"]
    assert SPOOL not in read_manifest(dask)["files"] and not dask.file(SPOOL).exists()


def test_language_checks_and_truncation_on_the_workers_match_local(tmp_path):
    collected = collected_stage(tmp_path / "in")
    checks = {"batch_size": 4, "languages": ["en"], "max_chars": 120, "over_length": "truncate"}
    local = run_clean(tmp_path / "local", collected, CleanSpec(workers=1, **checks))
    dask = run_clean(tmp_path / "dask", collected, CleanSpec(workers=2, executor="dask", **checks))
    assert stage_files(dask) == stage_files(local)
    assert read_stats(dask) == read_stats(local)
    dropped = read_manifest(dask)["ledger"]["dropped"]
    assert "language_unsure" in dropped or "language_not_allowed" in dropped
    assert '"truncated": "chars"' in stage_files(dask)["records.jsonl"]


def test_a_running_scheduler_at_dask_address_cleans_the_shards(tmp_path):
    from distributed import LocalCluster

    collected = collected_stage(tmp_path / "in")
    local = run_clean(tmp_path / "local", collected, CleanSpec(batch_size=4, workers=1))
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        spec = CleanSpec(batch_size=4, executor="dask", dask_address=cluster.scheduler_address)
        remote = run_clean(tmp_path / "remote", collected, spec)
    assert stage_files(remote) == stage_files(local)


def test_the_executor_does_not_change_the_digest_so_dask_reuses_the_local_stage(tmp_path):
    collected = collected_stage(tmp_path / "in")
    local = run_clean(tmp_path, collected, CleanSpec(batch_size=4))
    # the address is dead: reaching it would fail, so the stage must come from the local run
    spec = CleanSpec(batch_size=4, executor="dask", dask_address=dead_address())
    assert run_clean(tmp_path, collected, spec) == local


def test_unreachable_dask_address_names_the_field_the_value_and_the_fix(tmp_path):
    collected = collected_stage(tmp_path / "in")
    address = dead_address()
    with pytest.raises(DaskAddressError) as caught:
        run_clean(tmp_path / "out", collected, CleanSpec(executor="dask", dask_address=address))
    message = str(caught.value)
    assert f"clean.dask_address {address!r}: no Dask scheduler reachable there" in message
    assert "`dask scheduler`" in message and "remove clean.dask_address" in message
    with pytest.raises(DaskAddressError, match="clean.dask_address 'scheduler': no Dask scheduler"):
        run_clean(tmp_path / "out", collected, CleanSpec(executor="dask", dask_address="scheduler"))
    assert not list((tmp_path / "out").glob("clean/*"))


def test_recipe_fields_default_to_local_and_stay_out_of_existing_digests():
    assert "executor" not in CleanSpec().model_dump(mode="json")
    assert CleanSpec(executor="dask").model_dump(mode="json")["executor"] == "dask"
    assert CleanSpec().model_dump(mode="json", context={"resolved": True})["executor"] == "local"
    with pytest.raises(ValueError, match="clean.dask_address 'tcp://s:8786' is set but clean.executor"):
        CleanSpec(dask_address="tcp://s:8786")
    schema = json.dumps(Recipe.model_json_schema())
    assert "a running Dask scheduler" in schema and "exact and near dedup stay global" in schema


def test_bucketed_near_dedup_equals_the_streaming_rule():
    """Buckets and clusters over all shards flag exactly what the local executor's streaming
    index flags, chains included (a record near only a dropped one is kept)."""
    rng = random.Random(7)
    for _ in range(50):
        n, bands = rng.randint(1, 60), rng.choice([1, 4, 8])
        keys = np.array([[rng.randint(0, 40) for _ in range(bands)] for _ in range(n)], dtype=np.uint64)
        alive = [rng.random() > 0.2 for _ in range(n)]
        streaming = NearDedup(0.8, 5, 64)
        flags = streaming.flags_from_keys([row.tolist() for row in keys], alive)
        indices = np.flatnonzero(alive)
        assert near_duplicates(indices, keys[indices]) == {i for i, flag in enumerate(flags) if flag}


def test_shard_ledgers_that_do_not_add_up_stop_the_stage(tmp_path):
    with (
        pytest.raises(LedgerError, match="shard ledgers add up to in 3"),
        write_stage(tmp_path, "clean", "x") as writer,
    ):
        writer.count_in(2)
        writer.keep({"id": "a"})
        writer.keep({"id": "b"})
        finish_stats(writer, {}, [{"in": 3, "out": 2, "dropped": {"too_short": 1}}])
    assert find_stage(tmp_path, "clean", "x") is None
