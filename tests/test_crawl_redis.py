"""A crawl shared through Redis (a crawl source's `redis_url`): processes on several hosts, one crawl.

Debian's redis-server on a unix socket (tests/redis_server.py); the loopback fixture site of
tests/test_crawl.py, which counts the requests it gets per path. Two "hosts" are two artifact
stores fetching the same source at the same time, each with its own crawl process.
"""

import http.server
import json
import os
import shutil
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError
from redis_server import RedisServer, redis_server_fixture  # noqa: F401  (Debian's redis-server on a socket)
from sites.site import WORDS, FixtureSite, page

from tuneline.recipe import CrawlSource
from tuneline.sources.errors import SourceUnreachable
from tuneline.sources.fetch import run_fetch
from tuneline.store import iter_records, read_manifest


def outcome(url, stage):
    """What a crawl kept (paths), its ledger and what it refused, comparable across sites."""
    kept = sorted(item["url"].removeprefix(url) for item in iter_records(stage, "items.jsonl"))
    stats = json.loads(stage.file("crawl_stats.json").read_text())
    refused = {key: n for key, n in stats.items() if key.startswith(("tuneline/refused", "robotstxt/forb"))}
    return kept, read_manifest(stage)["ledger"], refused


def test_two_hosts_crawl_the_site_once_with_the_result_of_one_process(redis_server, tmp_path):
    alone, together = FixtureSite(), FixtureSite()
    try:
        source = CrawlSource(name="docs", start_urls=[alone.url + "/"], allow_private=True, max_depth=3)
        shared = source.model_copy(update={"start_urls": [together.url + "/"], "redis_url": redis_server.url})
        # Two hosts: two stores, one Redis, the same recipe; beside them, one process alone.
        with ThreadPoolExecutor(3) as pool:
            single, *hosts = pool.map(run_fetch, [tmp_path / name for name in ("single", "a", "b")],
                                      [source, shared, shared])  # fmt: skip
        before = sum(together.hits.values())
        hosts.append(run_fetch(tmp_path / "late", shared))  # a host started after the end: reads, no crawl
        assert sum(together.hits.values()) == before
    finally:
        alone.close()
        together.close()

    assert hosts[0].digest == hosts[1].digest == hosts[2].digest
    expected = outcome(alone.url, single)
    assert len(expected[0]) > 30
    for stage in hosts:
        assert outcome(together.url, stage) == expected, "every host's stage holds the whole crawl"
    pages = {path: n for path, n in together.hits.items() if path != "/robots.txt"}
    assert pages == {path: n for path, n in alone.hits.items() if path != "/robots.txt"}, "each page once"
    assert together.hits["/private/secret"] == 0, "robots.txt disallows /private/"
    # Each process reads robots.txt itself, before its first page (one that starts late may get none).
    assert 1 <= together.hits["/robots.txt"] <= 2
    stats = json.loads(hosts[2].file("crawl_stats.json").read_text())
    assert stats["tuneline/shared_processes"] == 3, "the late host's process joined, found nothing left"
    keys = redis_server.client.keys(f"tuneline:crawl:{hosts[0].digest}:*")
    assert keys and all(0 < redis_server.client.ttl(key) <= 600 for key in keys), "the keys expire"


def test_two_processes_keep_one_page_budget_and_obey_robots_txt(tmp_path, tmp_path_factory, monkeypatch):
    """Five disallowed start URLs come first; three of the four allowed pages fit in max_pages: 3,
    whichever process takes them (pages robots.txt refused go back to the shared budget). This
    Redis asks for a password, which comes from REDISCLI_AUTH, never the recipe."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"), password="s3cret")  # a short socket path
    site = FixtureSite()
    monkeypatch.setenv("REDISCLI_AUTH", "s3cret")
    try:
        disallowed = [f"/private/{n}" for n in range(5)]
        allowed = ["/page/0", "/page/1", "/page/2", "/page/3"]
        source = CrawlSource(
            name="docs", start_urls=[site.url + path for path in disallowed + allowed], max_depth=0,
            max_pages=3, allow_private=True, processes=2, redis_url=redis_server.url,
        )  # fmt: skip
        fetched = run_fetch(tmp_path, source)
        monkeypatch.delenv("REDISCLI_AUTH")
        with pytest.raises(
            SourceUnreachable, match=r"does not answer \(AuthenticationError.*set REDISCLI_AUTH"
        ):
            run_fetch(tmp_path, source.model_copy(update={"max_pages": 4}))
    finally:
        site.close()
        redis_server.close()
    assert not any(site.hits[path] for path in disallowed)
    assert sum(site.hits[path] for path in allowed) == 3, dict(site.hits)
    assert len(list(iter_records(fetched, "items.jsonl"))) == 3
    stats = json.loads(fetched.file("crawl_stats.json").read_text())
    assert stats["robotstxt/forbidden"] == 5 and stats["tuneline/shared_processes"] == 2


def test_a_redis_url_that_is_not_one_names_the_field_and_the_forms_it_takes():
    with pytest.raises(ValidationError, match=r"(?s)redis_url.*holds a password.*set REDISCLI_AUTH"):
        CrawlSource(name="docs", start_urls=["https://example.com/"], redis_url="redis://:pw@cache:6379/0")
    with pytest.raises(
        ValidationError, match=r"(?s)redis_url.*'cache:6379' is not a Redis URL; write redis://"
    ):
        CrawlSource(name="docs", start_urls=["https://example.com/"], redis_url="http://user:pw@cache:6379")


def test_a_redis_that_does_not_answer_is_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = CrawlSource(
        name="docs", start_urls=["http://127.0.0.1:9/"], allow_private=True,
        redis_url=f"redis://tuneline@127.0.0.1:{port}/0",
    )  # fmt: skip
    with pytest.raises(SourceUnreachable) as raised:
        run_fetch(tmp_path / "store", source)
    message = str(raised.value)
    assert message.startswith(f"source 'docs': redis_url redis://127.0.0.1:{port}/0 does not answer")
    assert "start Redis there, fix redis_url" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__, "no chained traceback"
    assert not list((tmp_path / "store" / "stages" / "fetch").iterdir()), "no partial stage"


class GeneratedSite:
    """A site of `pages` articles, page n linking to pages 2n+1 and 2n+2, each answered after
    `delay_s` (the nav links of every page lead to / and /about too); records the most requests
    it had in flight at once and the requests per path."""

    def __init__(self, pages: int, delay_s: float = 0.0) -> None:
        state = {"now": 0, "most": 0, "hits": 0}
        paths: Counter = Counter()
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with lock:
                    state["now"] += 1
                    state["hits"] += 1
                    paths[self.path] += 1
                    state["most"] = max(state["most"], state["now"])
                time.sleep(delay_s)
                with lock:  # before the answer: the crawler may send its next request once it has it
                    state["now"] -= 1
                n = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/page/") else -1
                links = "".join(f"<a href='/page/{k}'>{k}</a> " for k in (2 * n + 1, 2 * n + 2) if k < pages)
                body = page(f"Article {n}", f"<p>Article number {n}. {WORDS * 3}</p>{links}")
                if self.path == "/robots.txt":
                    body = b"User-agent: *\nDisallow: /private/\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.state = state
        self.paths = paths
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_two_hosts_keep_the_concurrency_of_the_whole_crawl(redis_server, tmp_path):
    """Each host's process may have `concurrency` requests in flight by Scrapy's own cap (two hosts:
    twice that); the leases in Redis hold the site at `concurrency` for the crawl as a whole."""
    site = GeneratedSite(pages=60, delay_s=0.1)
    try:
        source = CrawlSource(
            name="slow", start_urls=[site.url + "/page/0"], allow_private=True, max_depth=10,
            concurrency=2, redis_url=redis_server.url,
        )  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            stages = list(pool.map(run_fetch, [tmp_path / "a", tmp_path / "b"], [source] * 2))
    finally:
        site.close()
    kept = {item["url"].removeprefix(site.url) for item in iter_records(stages[0], "items.jsonl")}
    assert {f"/page/{n}" for n in range(60)} <= kept
    assert {path: n for path, n in site.paths.items() if path != "/robots.txt"} == dict.fromkeys(kept, 1)
    assert site.state["most"] == 2
    parts = redis_server.client.lrange(f"tuneline:crawl:{stages[0].digest}:stats", 0, -1)
    assert all(json.loads(part).get("response_received_count") for part in parts), "both hosts crawled"


@pytest.mark.skipif(
    not os.environ.get("TUNELINE_BENCH_CRAWL"), reason="a measurement: TUNELINE_BENCH_CRAWL=1"
)
def test_measure_pages_per_second_and_concurrency(redis_server, tmp_path):
    """Pages/s of one process, two processes sharing files, two sharing Redis (one host) and
    two hosts of one process each; then the most requests in flight on a slow site."""
    pages = int(os.environ.get("TUNELINE_BENCH_PAGES", "1500"))
    runs = [  # name, hosts, the source's options
        ("1 process", 1, {"processes": 1}),
        ("2 processes, file frontier", 1, {"processes": 2}),
        ("2 processes, Redis", 1, {"processes": 2, "redis_url": redis_server.url}),
        ("2 hosts x 1 process, Redis", 2, {"processes": 1, "redis_url": redis_server.url}),
    ]
    for delay_s, concurrency in ((0.0, 8), (0.05, 4)):
        for name, hosts, options in runs:
            site = GeneratedSite(pages, delay_s)
            source = CrawlSource(
                name="bench", start_urls=[site.url + "/page/0"], allow_private=True, max_depth=20,
                max_pages=pages, concurrency=concurrency, **options,
            )  # fmt: skip
            stores = [tmp_path / f"{delay_s}-{name}-{host}" for host in range(hosts)]
            started = time.monotonic()
            with ThreadPoolExecutor(hosts) as pool:
                stages = list(pool.map(run_fetch, stores, [source] * hosts))
            took = time.monotonic() - started
            site.close()
            kept = len(list(iter_records(stages[0], "items.jsonl")))
            print(
                f"delay {delay_s * 1000:.0f} ms, concurrency {concurrency}, {name}: {kept} pages kept, "
                f"{site.state['hits']} requests, {kept / took:.0f} pages/s ({took:.1f} s), "
                f"most in flight {site.state['most']}; load {os.getloadavg()[0]:.1f}"
            )
