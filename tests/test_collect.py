"""Collect: local files and fsspec URLs into one record set; sources named in every failure."""

import json

import pytest

from tuneline.collect import SourceError, run_collect, source_fingerprint
from tuneline.recipe import FileSource
from tuneline.store import iter_records, read_manifest, read_stats


def alpaca_file(path, rows, extra_lines=()):
    lines = [json.dumps({"instruction": q, "input": "", "output": a}) for q, a in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_collects_sources_with_rejects_and_counts(tmp_path):
    first = alpaca_file(tmp_path / "a.jsonl", [("q1", "a1"), ("q2", "a2")], ['{"instruction": "broken'])
    second = alpaca_file(tmp_path / "b.jsonl", [("q3", "a3")])
    sources = [FileSource(name="a", path=str(first)), FileSource(name="b", path=second.as_uri())]
    ref = run_collect(tmp_path / "store", sources)
    records = list(iter_records(ref))
    assert [r["meta"]["source"] for r in records] == ["a", "a", "b"]
    assert all("fetched_at" in r["meta"] for r in records)
    assert read_manifest(ref)["ledger"] == {"in": 4, "out": 3, "dropped": {"unreadable": 1}}
    reject = json.loads(ref.file("rejects.jsonl").read_text())
    assert reject["detail"].startswith(f"{first}:3:")
    assert read_stats(ref)["sources"] == {
        "a": {"records": 2, "rejected": 1},
        "b": {"records": 1, "rejected": 0},
    }


def test_cache_follows_content_not_path(tmp_path):
    path = alpaca_file(tmp_path / "a.jsonl", [("q1", "a1")])
    sources = [FileSource(name="a", path=str(path))]
    first = run_collect(tmp_path / "store", sources)
    assert run_collect(tmp_path / "store", sources) == first
    alpaca_file(path, [("q1", "a1"), ("q2", "a2")])
    assert run_collect(tmp_path / "store", sources).digest != first.digest


def test_missing_source_is_named(tmp_path):
    with pytest.raises(SourceError, match=r"source 'gone': .*nope.jsonl does not exist"):
        source_fingerprint(FileSource(name="gone", path=str(tmp_path / "nope.jsonl")))
