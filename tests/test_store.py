"""The artifact store: atomic stage folders, manifests written last, the ledger enforced, one
writer per stage at a time, and no temporary folder of a killed writer kept."""

import json
import logging
import signal
import subprocess
import sys
import threading
import time

import pytest

from tuneline.store import (
    LedgerError,
    Stage,
    StageCorrupt,
    check_ledger,
    find_stage,
    iter_records,
    read_manifest,
    remove_stale_temporaries,
    reuse_or_write,
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


WRITER = """
import sys, time
from pathlib import Path
from tuneline.store import write_stage

root, digest, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with write_stage(root, "clean", digest) as writer:
    print("writing", flush=True)
    while not go.exists():
        time.sleep(0.05)
    writer.count_in()
    writer.keep({"n": "written by the first run"})
"""


def start_writer(root, digest: str) -> subprocess.Popen:
    """Another process writing stage clean/<digest>, until a `go` file appears in `root`."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), digest, str(root / f"go-{digest}")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    return process


def test_a_second_writer_waits_says_for_whom_then_reuses_the_first_writers_stage(tmp_path, caplog):
    first = start_writer(tmp_path, "abc")
    calls = []
    found = []
    second = threading.Thread(
        target=lambda: found.append(
            reuse_or_write(tmp_path, Stage("clean", "x", ()), "abc", lambda writer: calls.append(writer))
        )
    )
    with caplog.at_level(logging.WARNING, logger="tuneline.store"):
        second.start()
        deadline = time.monotonic() + 10
        while "waiting for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.is_alive()  # it waits: nothing written twice, nothing interleaved
        (tmp_path / "go-abc").touch()
        second.join(timeout=10)
    assert first.wait(timeout=10) == 0
    assert f"waiting for pid {first.pid} (" in caplog.text
    assert "which is writing stage clean abc" in caplog.text
    assert calls == []  # the second run did no work of its own
    assert [r["n"] for r in iter_records(found[0])] == ["written by the first run"]


def test_a_killed_writers_lock_is_released_and_its_temporary_folder_removed_at_start(tmp_path):
    killed = start_writer(tmp_path, "dead")
    live = start_writer(tmp_path, "live")
    stale_old_style = tmp_path / "stages" / "clean" / ".tmp-olddigest-1234abcd"
    stale_old_style.mkdir()
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    try:
        temporaries = sorted(p.name for p in (tmp_path / "stages" / "clean").iterdir())
        assert [name.rpartition("-")[0] for name in temporaries] == [
            ".tmp-dead",
            ".tmp-live",
            ".tmp-olddigest",
        ]
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name.rpartition("-")[0] for p in removed) == [".tmp-dead", ".tmp-olddigest"]
        left = [p.name for p in (tmp_path / "stages" / "clean").iterdir()]
        assert [name.rpartition("-")[0] for name in left] == [".tmp-live"]  # a live run's is kept
        (tmp_path / "go-live").touch()
        assert live.wait(timeout=10) == 0
    finally:
        live.kill()
    with write_stage(tmp_path, "clean", "dead") as writer:  # its lock is free at once
        writer.count_in()
        writer.keep({"n": 1})
    assert sorted(p.name for p in (tmp_path / "stages" / "clean").iterdir()) == ["dead", "live"]
