"""Download and Hugging Face sources: resumable, checked downloads and load_dataset rows.

A loopback file server drops the connection in the middle of a file (the download must resume
it with a Range request), serves a file that does not match its sha256, fails twice before
answering, or stays down.
"""

import functools
import gzip
import hashlib
import http.server
import json
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tuneline.recipe import HfSource, UrlSource
from tuneline.sources.collect import run_collect
from tuneline.sources.download import download
from tuneline.sources.errors import SourceError, SourceUnreachable
from tuneline.sources.fetch import run_fetch
from tuneline.store import iter_records, read_manifest, read_stats


def alpaca_lines(n: int) -> bytes:
    rows = [{"instruction": f"question {i}", "input": "", "output": f"answer {i} " * 20} for i in range(n)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


class FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the test folder with Range support; `drop_once` paths send half a file then close,
    `failures` paths answer 500 that many times; `ranges` records the Range header of each GET."""

    drop_once: set = set()
    failures: Counter = Counter()
    ranges: list = []
    delay_s: float = 0.0

    def do_GET(self):  # noqa: N802
        self.ranges.append((self.path, self.headers.get("Range")))
        time.sleep(self.delay_s)
        if self.failures[self.path] > 0:
            self.failures[self.path] -= 1
            self.send_error(500, "flaky")
            return
        path = self.directory_path / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404, "not found")
            return
        body = path.read_bytes()
        start = 0
        if range_header := self.headers.get("Range"):
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.drop_once:
            self.drop_once.discard(self.path)
            self.wfile.write(body[start : len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def files(tmp_path):
    """(folder served, base URL) of a loopback file server on an OS-chosen port."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (FileHandler,), {"drop_once": set(), "failures": Counter(), "ranges": []})
    handler.directory_path = folder
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def test_interrupted_download_resumes_with_a_range_request(files, tmp_path):
    folder, url, handler = files
    data = alpaca_lines(200)
    (folder / "big.jsonl").write_bytes(data)
    handler.drop_once.add("/big.jsonl")
    source = UrlSource(name="big", url=f"{url}/big.jsonl", sha256=hashlib.sha256(data).hexdigest())
    ref = run_collect(tmp_path / "store", [source])
    assert read_manifest(ref)["ledger"] == {"in": 200, "out": 200, "dropped": {}}
    assert handler.ranges == [("/big.jsonl", None), ("/big.jsonl", f"bytes={len(data) // 2}-")]
    record = next(iter_records(ref))
    assert record["meta"]["url"] == source.url and record["meta"]["source"] == "big"
    assert record["meta"]["fetched_at"]
    assert not (tmp_path / "store" / "downloads").exists() or not any(
        (tmp_path / "store" / "downloads").iterdir()
    )


def test_two_runs_fetching_one_url_at_once_download_it_once(files, tmp_path):
    """The second waits on the stage's lock (no two writers of one partial file), then reuses it."""
    folder, url, handler = files
    (folder / "data.jsonl").write_bytes(alpaca_lines(50))
    handler.delay_s = 0.5  # both fetches start while the first download is under way
    source = UrlSource(name="data", url=f"{url}/data.jsonl")
    with ThreadPoolExecutor(2) as pool:
        refs = list(pool.map(lambda _: run_fetch(tmp_path / "store", source), range(2)))
    assert refs[0] == refs[1]
    assert handler.ranges == [("/data.jsonl", None)]


def test_corrupted_file_fails_naming_both_digests(files, tmp_path):
    folder, url, _ = files
    (folder / "data.jsonl").write_bytes(alpaca_lines(3))
    expected = hashlib.sha256(b"what the publisher released").hexdigest()
    actual = hashlib.sha256(alpaca_lines(3)).hexdigest()
    source = UrlSource(name="pub", url=f"{url}/data.jsonl", sha256=expected)
    with pytest.raises(
        SourceError, match=f"source 'pub'.*sha256 mismatch: expected {expected}, got {actual}"
    ) as error:
        run_fetch(tmp_path / "store", source)
    assert not isinstance(error.value, SourceUnreachable)
    assert not (tmp_path / "store" / "stages").exists(), "no stage for a corrupted download"


def test_server_errors_are_retried_with_backoff(files, tmp_path):
    folder, url, handler = files
    (folder / "a.jsonl").write_bytes(alpaca_lines(2))
    handler.failures["/a.jsonl"] = 2
    got = download(f"{url}/a.jsonl", tmp_path / "a.part", name="a", retries=3, backoff_s=0.01)
    assert got.tries == 3 and got.errors == ["HTTP 500 flaky", "HTTP 500 flaky"]


def test_a_server_that_stays_down_fails_naming_the_source_and_last_error(files, tmp_path):
    folder, url, handler = files
    (folder / "a.jsonl").write_bytes(alpaca_lines(2))
    handler.failures["/a.jsonl"] = 100
    with pytest.raises(SourceUnreachable, match=r"source 'a': .*after 2 tries; last error: HTTP 500"):
        download(f"{url}/a.jsonl", tmp_path / "a.part", name="a", retries=1, backoff_s=0.01)
    with pytest.raises(SourceError, match=r"source 'a': .*answered HTTP 404"):
        download(f"{url}/missing.jsonl", tmp_path / "m.part", name="a", retries=1, backoff_s=0.01)


def test_gzip_and_zip_downloads_are_unpacked(files, tmp_path):
    folder, url, _ = files
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(alpaca_lines(3)))
    with zipfile.ZipFile(folder / "b.zip", "w") as archive:
        archive.writestr("part1.jsonl", alpaca_lines(2))
        archive.writestr("sub/part2.json", json.dumps([{"prompt": "p", "completion": "c"}]))
        archive.writestr("README.md", "not a dataset")
    sources = [UrlSource(name="gz", url=f"{url}/a.jsonl.gz"), UrlSource(name="zip", url=f"{url}/b.zip")]
    ref = run_collect(tmp_path / "store", sources)
    counts = read_stats(ref)["sources"]
    assert counts["gz"]["records"] == 3 and counts["zip"]["records"] == 3
    zipped = run_fetch(tmp_path / "store", sources[1])
    assert read_stats(zipped)["skipped_members"] == ["README.md"]


def test_file_urls_are_copied_through_fsspec(tmp_path):
    path = tmp_path / "local.jsonl"
    path.write_bytes(alpaca_lines(4))
    ref = run_collect(tmp_path / "store", [UrlSource(name="local", url=path.as_uri())])
    assert read_manifest(ref)["ledger"]["out"] == 4


def test_hf_source_maps_columns_through_load_dataset(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    rows = [{"question": f"q{i}", "answer": f"a{i}", "topic": "x"} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    columns = {"question": "instruction", "answer": "output"}
    from_folder = HfSource(name="qa", dataset=str(folder), split="train", columns=columns)
    from_file = HfSource(name="qa-file", dataset=str(folder / "test.jsonl"), columns=columns)
    ref = run_collect(tmp_path / "store", [from_folder, from_file])
    records = list(iter_records(ref))
    assert [r["meta"]["source"] for r in records] == ["qa"] * 5 + ["qa-file"]
    assert records[0]["messages"] == [
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"},
    ]
    assert records[0]["meta"]["url"] == str(folder)
    with pytest.raises(SourceError, match=r"columns \['query'\] are not in"):
        run_fetch(
            tmp_path / "store", HfSource(name="bad", dataset=str(folder), columns={"query": "instruction"})
        )


def test_fetch_task_retries_a_source_that_fails_twice_and_the_flow_fails_on_one_that_stays_down(
    files, tmp_path, prefect_server
):
    from prefect import flow
    from tuneline.tasks.stages import collect, fetch

    folder, url, handler = files
    (folder / "a.jsonl").write_bytes(alpaca_lines(2))
    store = tmp_path / "store"

    quick_fetch = fetch.with_options(retry_delay_seconds=0)  # the retries, not their waits

    @flow
    def collect_sources(sources):
        fetched = quick_fetch.map(store, sources).result()  # as in the finetune flow
        return collect(store, sources, fetched)

    handler.failures["/a.jsonl"] = 2  # no retries inside the download: the task's retries do it
    flaky = UrlSource(name="flaky", url=f"{url}/a.jsonl", retries=0)
    assert read_manifest(collect_sources([flaky]))["ledger"]["out"] == 2

    handler.failures["/b.jsonl"] = 100
    (folder / "b.jsonl").write_bytes(alpaca_lines(1))
    down = UrlSource(name="down", url=f"{url}/b.jsonl", sha256="0" * 64, retries=0)
    with pytest.raises(SourceUnreachable, match="source 'down'.*last error: HTTP 500"):
        collect_sources([down])
    assert len(list((store / "stages" / "collect").iterdir())) == 1, "no collect stage for the failed run"
