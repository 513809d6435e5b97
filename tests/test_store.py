"""The artifact store: atomic stage folders, manifests written last, the ledger enforced."""

import json

import pytest

from tuneline.store import (
    LedgerError,
    StageCorrupt,
    check_ledger,
    find_stage,
    iter_records,
    read_manifest,
    stage_digest,
    verify_stage,
    write_stage,
)


def test_finished_stage_has_manifest_with_ledger_and_hashes(tmp_path):
    with write_stage(tmp_path, "clean", "abc") as writer:
        for n in range(5):
            writer.count_in()
            if n % 2:
                writer.drop({"n": n}, "odd", detail=f"{n} is odd")
            else:
                writer.keep({"n": n})
        writer.stats = {"note": "x"}
    ref = find_stage(tmp_path, "clean", "abc")
    manifest = read_manifest(ref)
    assert manifest["ledger"] == {"in": 5, "out": 3, "dropped": {"odd": 2}}
    assert set(manifest["files"]) == {"records.jsonl", "rejects.jsonl", "stats.json"}
    assert [r["n"] for r in iter_records(ref)] == [0, 2, 4]
    rejects = [json.loads(line) for line in ref.file("rejects.jsonl").read_text().splitlines()]
    assert rejects[0] == {"reason": "odd", "detail": "1 is odd", "record": {"n": 1}}
    assert check_ledger(ref)["out"] == 3
    verify_stage(ref)


def test_a_crash_leaves_no_stage_and_no_temp_folder(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), write_stage(tmp_path, "clean", "abc") as writer:
        writer.count_in()
        writer.keep({"n": 1})
        raise RuntimeError("boom")
    assert find_stage(tmp_path, "clean", "abc") is None
    assert list((tmp_path / "stages" / "clean").iterdir()) == []


def test_a_lost_record_fails_the_stage(tmp_path):
    with (
        pytest.raises(LedgerError, match="3 records in but 1 out"),
        write_stage(tmp_path, "clean", "abc") as w,
    ):
        w.count_in(3)
        w.keep({"n": 1})
    assert find_stage(tmp_path, "clean", "abc") is None


def test_a_folder_without_manifest_is_not_a_stage_and_is_replaced(tmp_path):
    half = tmp_path / "stages" / "clean" / "abc"
    half.mkdir(parents=True)
    (half / "records.jsonl").write_text("half written")
    assert find_stage(tmp_path, "clean", "abc") is None
    with write_stage(tmp_path, "clean", "abc") as writer:
        writer.count_in()
        writer.keep({"n": 1})
    assert [r["n"] for r in iter_records(find_stage(tmp_path, "clean", "abc"))] == [1]


def test_changed_files_are_detected(tmp_path):
    with write_stage(tmp_path, "clean", "abc") as writer:
        writer.count_in()
        writer.keep({"n": 1})
    ref = find_stage(tmp_path, "clean", "abc")
    ref.file("records.jsonl").write_text('{"n": 2}\n')
    with pytest.raises(StageCorrupt, match="changed since the stage finished"):
        verify_stage(ref)


def test_digest_depends_on_every_part():
    base = stage_digest("train", {"lr": 1}, "input1")
    assert base == stage_digest("train", {"lr": 1}, "input1")
    assert base != stage_digest("train", {"lr": 2}, "input1")
    assert base != stage_digest("train", {"lr": 1}, "input2")
    assert base != stage_digest("evaluate", {"lr": 1}, "input1")
