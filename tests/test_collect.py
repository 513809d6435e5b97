"""Collect: local files and fsspec URLs into one record set; sources named in every failure."""

import functools
import http.server
import json
import threading

import pytest

from tuneline.recipe import FileSource
from tuneline.sources.collect import SourceError, SourceUnreachable, run_collect, source_fingerprint
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
    counts = read_stats(ref)["sources"]
    assert {name: {k: v for k, v in c.items() if k != "fetch"} for name, c in counts.items()} == {
        "a": {"kind": "file", "records": 2, "documents": 0, "dropped": {"unreadable": 1}},
        "b": {"kind": "file", "records": 1, "documents": 0, "dropped": {}},
    }
    assert all(
        (tmp_path / "store" / "stages" / "fetch" / c["fetch"] / "manifest.json").is_file()
        for c in counts.values()
    )


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


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the test folder; answers 500 to the first `failures` requests of each path."""

    failures: dict[str, int] = {}

    def send_head(self):
        left = self.failures.get(self.path, 0)
        if left:
            self.failures[self.path] = left - 1
            self.send_error(500, "flaky")
            return None
        return super().send_head()

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """A loopback HTTP server on an OS-chosen port, serving tmp_path."""
    handler = functools.partial(FlakyHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    FlakyHandler.failures.clear()


def test_collects_over_http(tmp_path, web):
    alpaca_file(tmp_path / "a.jsonl", [("q1", "a1"), ("q2", "a2")])
    ref = run_collect(tmp_path / "store", [FileSource(name="web", path=f"{web}/a.jsonl")])
    assert read_manifest(ref)["ledger"]["out"] == 2


def test_missing_url_is_a_user_error_and_a_down_server_is_retryable(tmp_path, web):
    with pytest.raises(SourceError, match="does not exist") as missing:
        source_fingerprint(FileSource(name="web", path=f"{web}/nope.jsonl"))
    assert not isinstance(missing.value, SourceUnreachable)
    FlakyHandler.failures["/a.jsonl"] = 100
    alpaca_file(tmp_path / "a.jsonl", [("q1", "a1")])
    with pytest.raises(SourceUnreachable, match="source 'web': cannot reach .*500"):
        source_fingerprint(FileSource(name="web", path=f"{web}/a.jsonl"))


def test_collect_task_retries_a_failing_source_then_succeeds(tmp_path, web, prefect_server):
    from prefect import flow
    from tuneline.tasks.stages import collect

    alpaca_file(tmp_path / "a.jsonl", [("q1", "a1")])
    FlakyHandler.failures["/a.jsonl"] = 2  # HEAD and GET of the first try fail with 500

    @flow
    def collect_only():
        return collect(tmp_path / "store", [FileSource(name="web", path=f"{web}/a.jsonl")])

    ref = collect_only()
    assert read_manifest(ref)["ledger"]["out"] == 1


@pytest.mark.parametrize("content", ["", "\n \n", "[]"])
def test_a_source_without_records_is_an_error_naming_source_and_file(tmp_path, content):
    empty = tmp_path / "empty.json"
    empty.write_text(content)
    good = alpaca_file(tmp_path / "a.jsonl", [("q1", "a1")])
    sources = [FileSource(name="good", path=str(good)), FileSource(name="blank", path=str(empty))]
    with pytest.raises(SourceError, match=rf"source 'blank': {empty} holds no records"):
        run_collect(tmp_path / "store", sources)
