"""The `refresh` flow and what it relies on: sources looked at again, the data's digest, a fixed
test set, and promotion only on a win.

A loopback file server gives one file with an ETag, one with only a Last-Modified date and one
with no validator at all, and counts HEADs and GETs; the crawl fixture site counts page hits.
"""

import hashlib
import http.server
import json
import os
import threading
from email.utils import formatdate
from pathlib import Path

import pytest
from sites.site import FixtureSite

from tuneline.curate.split import TestFileError, run_split
from tuneline.recipe import CrawlSource, HfSource, RecipeError, SplitSpec, UrlSource, validate_recipe
from tuneline.records import make_record
from tuneline.refresh import collected_digest
from tuneline.sources.collect import run_collect
from tuneline.sources.fetch import run_fetch
from tuneline.store import find_stage, iter_records, read_manifest, read_stats, write_stage

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "support_intents.jsonl"


class ValidatorHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under /etag/ with an ETag, /lm/ with only Last-Modified, /plain/ with neither;
    `requests` records (method, path) of every request."""

    folder: Path
    requests: list

    def do_HEAD(self):  # noqa: N802
        self.answer(body=False)

    def do_GET(self):  # noqa: N802
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        self.requests.append((self.command, self.path))
        kind, _, name = self.path.strip("/").partition("/")
        path = self.folder / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if kind == "etag":
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
        elif kind == "lm":
            self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, requests) of the validator server on an OS-chosen port."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (ValidatorHandler,), {"folder": folder, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_port}", handler.requests
    httpd.shutdown()
    httpd.server_close()


def intent_lines(start: int, count: int) -> list[str]:
    """`count` readable labelled lines of the support-intents data, from line `start`."""
    lines = []
    for line in DATA.read_text(encoding="utf-8").splitlines()[start:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["instruction"].strip() and row["output"].strip():
            lines.append(line)
        if len(lines) == count:
            return lines
    raise AssertionError("not enough data")


def write_lines(path: Path, lines: list[str], mtime: float | None = None) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def body_gets(requests: list, path: str) -> int:
    return sum(1 for method, seen in requests if method == "GET" and seen == path)


# --- the recipe ---------------------------------------------------------------------------------


def recipe_data(**sections):
    data = {
        "name": "r",
        "sources": [{"name": "a", "path": "a.jsonl"}],
        "model": {"name": "m"},
        "register": {"model_name": "r"},
    }
    return {**data, **sections}


def test_refresh_schedule_is_a_cron_or_an_interval_and_a_bad_one_names_the_field():
    cron = validate_recipe(recipe_data(refresh={"cron": "0 3 * * *"})).refresh.schedule()
    assert tuple(cron) == ("cron", "0 3 * * *", "UTC")
    every = validate_recipe(recipe_data(refresh={"interval_minutes": 1.5, "timezone": "Europe/Berlin"}))
    assert tuple(every.refresh.schedule()) == ("interval", 90.0, "Europe/Berlin")
    with pytest.raises(RecipeError, match=r"refresh.cron: not a cron expression: '0 3 \* \*'; write five"):
        validate_recipe(recipe_data(refresh={"cron": "0 3 * *"}))
    with pytest.raises(RecipeError, match=r"refresh: set exactly one of refresh.cron"):
        validate_recipe(recipe_data(refresh={"cron": "0 3 * * *", "interval_minutes": 5}))
    with pytest.raises(
        RecipeError, match=r"refresh.timezone: unknown time zone 'Berlin' \(close: Europe/Berlin\)"
    ):
        validate_recipe(recipe_data(refresh={"interval_minutes": 5, "timezone": "Berlin"}))


def test_unset_refresh_and_test_file_move_no_digest():
    plain = validate_recipe(recipe_data())
    scheduled = validate_recipe(recipe_data(refresh={"cron": "0 3 * * *"}))
    assert scheduled.digest() == plain.digest()  # a schedule registers no model again
    assert "test_file" not in plain.split.model_dump() and "refresh" not in plain.model_dump()


# --- fetch: looking again ----------------------------------------------------------------------


def test_a_changed_file_with_only_last_modified_and_the_same_size_is_downloaded_again(server, tmp_path):
    """Before, size and ETag alone were the fingerprint: the change went unseen."""
    folder, url, requests = server
    write_lines(folder / "d.jsonl", intent_lines(0, 5), mtime=1_700_000_000)
    source = UrlSource(name="d", url=f"{url}/lm/d.jsonl")
    first = run_fetch(tmp_path / "store", source)
    assert run_fetch(tmp_path / "store", source) == first
    assert body_gets(requests, "/lm/d.jsonl") == 1
    text = (folder / "d.jsonl").read_text().replace("get me a manager", "GET ME A MANAGER")
    (folder / "d.jsonl").write_text(text)  # the same size, a new date
    os.utime(folder / "d.jsonl", (1_700_000_100, 1_700_000_100))
    second = run_fetch(tmp_path / "store", source)
    assert second != first and body_gets(requests, "/lm/d.jsonl") == 2


def test_a_refresh_downloads_a_file_without_validators_again_and_its_content_decides(server, tmp_path):
    folder, url, requests = server
    write_lines(folder / "d.jsonl", intent_lines(0, 5))
    source = UrlSource(name="d", url=f"{url}/plain/d.jsonl")
    first = run_fetch(tmp_path / "store", source, refresh="r1")
    assert run_fetch(tmp_path / "store", source, refresh="r2") == first  # same bytes: same stage
    assert body_gets(requests, "/plain/d.jsonl") == 2
    text = (folder / "d.jsonl").read_text().replace("get me a manager", "GET ME A MANAGER")
    (folder / "d.jsonl").write_text(text)
    changed = run_fetch(tmp_path / "store", source, refresh="r3")
    assert changed != first and read_stats(changed)["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert not any((tmp_path / "store" / "downloads").iterdir()), "no download left behind"


def test_a_refresh_crawls_again_where_a_plain_run_reuses_the_crawl(tmp_path):
    site = FixtureSite()
    try:
        pages = [f"{site.url}/page/28", f"{site.url}/page/29"]
        source = CrawlSource(name="docs", start_urls=pages, max_depth=0, allow_private=True)
        first = run_fetch(tmp_path / "store", source)
        assert run_fetch(tmp_path / "store", source) == first  # a plain run reuses the crawl
        assert site.hits["/page/28"] == 1
        again = run_fetch(tmp_path / "store", source, refresh="r1")
        assert again != first and site.hits["/page/28"] == 2, "the refresh asked the site again"
        collected = [run_collect(tmp_path / "store", [source], [ref]) for ref in (first, again)]
        assert collected_digest(collected[0]) == collected_digest(collected[1])  # same pages, same data
    finally:
        site.close()


def test_hf_sources_record_the_revision_of_local_data_by_content(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    fetched = run_fetch(tmp_path / "store", HfSource(name="qa", dataset=str(folder)))
    assert read_stats(fetched)["revision"].startswith("content:")
    single = run_fetch(tmp_path / "store", HfSource(name="one", dataset=str(folder / "train.jsonl")))
    digest = hashlib.sha256((folder / "train.jsonl").read_bytes()).hexdigest()
    assert read_stats(single)["revision"] == f"sha256:{digest}"


# --- split: a fixed test set -------------------------------------------------------------------


def labelled(question: str, label: str) -> dict:
    return make_record([{"role": "user", "content": question}, {"role": "assistant", "content": label}])


def test_a_test_file_is_the_test_split_and_its_records_stay_out_of_training(tmp_path):
    records = [labelled(f"question number {i} about my order", f"label{i % 3}") for i in range(40)]
    with write_stage(tmp_path / "store", "gate", "g0") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    gated = find_stage(tmp_path / "store", "gate", "g0")
    test_file = tmp_path / "test.jsonl"
    outside = labelled("a question only the test file asks", "label9")
    test_file.write_text("".join(json.dumps(r) + "\n" for r in [records[0], records[1], outside]))
    splits = run_split(tmp_path / "store", gated, SplitSpec(test_file=str(test_file), decontaminate=False))
    assert [r["id"] for r in iter_records(splits, "test.jsonl")] == [
        records[0]["id"],
        records[1]["id"],
        outside["id"],
    ]
    trained = {r["id"] for name in ("train.jsonl", "validation.jsonl") for r in iter_records(splits, name)}
    assert not trained & {records[0]["id"], records[1]["id"]}
    assert len(trained) == 38 and read_manifest(splits)["ledger"]["dropped"] == {"in_test_file": 2}
    assert read_stats(splits)["counts"]["test"] == 3
    test_file.write_text("{not json\n")
    with pytest.raises(TestFileError, match=r"split.test_file: .*test.jsonl:1: "):
        run_split(tmp_path / "store", gated, SplitSpec(test_file=str(test_file)))
