"""Clean and split: every drop has a reason, and the split is stable."""

import pytest

from tuneline.curate.clean import normalize_record, run_clean
from tuneline.curate.split import assign_split, run_split
from tuneline.recipe import CleanSpec, SplitSpec
from tuneline.records import make_record
from tuneline.store import find_stage, iter_records, read_manifest, write_stage


def conversation(user, assistant):
    return make_record([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def stage_of(tmp_path, records, stage="collect"):
    with write_stage(tmp_path, stage, "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    return find_stage(tmp_path, stage, "in")


@pytest.mark.parametrize(
    ("record", "spec", "reason"),
    [
        (conversation("hi", "   "), CleanSpec(), "empty_turn"),
        (conversation("", "an answer"), CleanSpec(), "empty_turn"),
        (conversation("q", "a"), CleanSpec(min_chars=5), "too_short"),
        (conversation("q" * 50, "a" * 50), CleanSpec(max_chars=60), "too_long"),
    ],
)
def test_each_filter_drops_with_its_reason(tmp_path, record, spec, reason):
    ref = run_clean(tmp_path, stage_of(tmp_path, [record]), spec)
    assert read_manifest(ref)["ledger"] == {"in": 1, "out": 0, "dropped": {reason: 1}}
    assert reason in ref.file("rejects.jsonl").read_text()


def test_duplicates_after_normalization_are_dropped(tmp_path):
    records = [
        conversation("Caf\u0065\u0301 hours?", "open"),
        conversation("  Caf\u00e9 hours?\r\n", "open"),
        conversation("other question", "closed"),
    ]
    ref = run_clean(tmp_path, stage_of(tmp_path, records), CleanSpec())
    assert read_manifest(ref)["ledger"] == {"in": 3, "out": 2, "dropped": {"duplicate": 1}}
    assert [r["messages"][0]["content"] for r in iter_records(ref)] == ["Caf\u00e9 hours?", "other question"]


def test_normalize_recomputes_the_id():
    record = conversation(" hello ", "x")
    assert normalize_record(record)["id"] == conversation("hello", "x")["id"]


def test_clean_is_cached_by_content(tmp_path):
    collected = stage_of(tmp_path, [conversation("a question", "an answer")])
    first = run_clean(tmp_path, collected, CleanSpec())
    assert run_clean(tmp_path, collected, CleanSpec()) == first
    assert run_clean(tmp_path, collected, CleanSpec(min_chars=1)).digest != first.digest


def test_split_is_deterministic_and_complete(tmp_path):
    records = [conversation(f"question {n}", f"answer {n}") for n in range(400)]
    spec = SplitSpec(validation=0.1, test=0.2, seed=3)
    ref = run_split(tmp_path, stage_of(tmp_path, records, "gate"), spec)
    names = {
        name: [r["id"] for r in iter_records(ref, f"{name}.jsonl")]
        for name in ("train", "validation", "test")
    }
    assert sum(map(len, names.values())) == 400
    assert 50 < len(names["test"]) < 110 and 20 < len(names["validation"]) < 65
    assert all(assign_split(rid, spec) == "test" for rid in names["test"])
    assert assign_split(names["test"][0], SplitSpec(validation=0.1, test=0.2, seed=4)) in (
        "train",
        "validation",
        "test",
    )
    assert read_manifest(ref)["ledger"] == {"in": 400, "out": 400, "dropped": {}}
