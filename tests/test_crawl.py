"""Crawl sources: the generic spider on a loopback fixture site, in a subprocess per crawl.

The site (tests/sites/site.py) has 30 articles, a robots.txt disallowing /private/, a page that
fails twice, a redirect to a host outside the allowed domains, a link to a private address,
pages that cannot be parsed, and FAQ pages.
"""

import json
import socket
import sys
import time

import pytest
from pydantic import ValidationError
from sites.site import ARTICLES, FixtureSite
from tuneline.crawlers.args import SiteArgs
from tuneline.crawlers.middlewares import host_allowed, non_public_address

from tuneline.recipe import CrawlSource
from tuneline.sources.collect import DOCUMENTS, run_collect
from tuneline.sources.errors import SourceError, SourceUnreachable
from tuneline.sources.fetch import run_fetch
from tuneline.store import iter_records, read_manifest, read_stats


@pytest.fixture(scope="module")
def site():
    server = FixtureSite()
    yield server
    server.close()


def test_spider_arguments_mirror_the_recipe_section():
    assert set(SiteArgs.model_fields) == set(CrawlSource.model_fields) - {"kind", "name"}
    for name, field in SiteArgs.model_fields.items():
        assert field.default == CrawlSource.model_fields[name].default, name


@pytest.mark.parametrize(
    ("host", "domains", "subdomains", "allowed"),
    [("example.com", ["example.com"], False, True), ("EXAMPLE.com.", ["example.com"], False, True),
     ("docs.example.com", ["example.com"], False, False), ("docs.example.com", ["example.com"], True, True),
     ("badexample.com", ["example.com"], True, False), ("example.com.evil.org", ["example.com"], True, False),
     ("localhost", ["example.com"], True, False),
     ("bücher.example", ["xn--bcher-kva.example"], False, True),
     # An IP address matches only itself, whatever its spelling, never as a suffix.
     ("127.0.0.1", ["127.1"], False, True), ("0x7f.0.0.1", ["127.0.0.1"], False, True),
     ("2130706433", ["127.0.0.1"], False, True), ("0177.0.0.1", ["127.1"], False, True),
     ("::ffff:127.0.0.1", ["127.0.0.1"], False, True), ("0:0::1", ["::1"], False, True),
     ("127.0.127.1", ["127.1"], False, False), ("127.0.127.1", ["127.1"], True, False),
     ("10.1.2.3", ["2.3"], True, False), ("127.0.0.2", ["127.0.0.1"], True, False),
     ("1.127.0.0.1", ["127.0.0.1"], True, False), ("dead.beef", ["222.173.190.239"], True, False)],
)  # fmt: skip
def test_hosts_compare_exactly_after_normalising_their_spelling(host, domains, subdomains, allowed):
    args = SiteArgs(start_urls=["http://x/"], allowed_domains=domains, subdomains=subdomains)
    assert host_allowed(host, args.domains(), subdomains) is allowed


def test_allowed_domains_must_be_hosts():
    with pytest.raises(ValidationError, match=r"'https://docs.example.com/' is not a host.*without scheme"):
        CrawlSource(
            name="docs",
            start_urls=["https://docs.example.com/"],
            allowed_domains=["https://docs.example.com/"],
        )
    with pytest.raises(ValidationError, match=r"'example.com:8080' is not a host"):
        CrawlSource(name="docs", start_urls=["https://example.com/"], allowed_domains=["example.com:8080"])


def test_a_start_url_on_127_1_reaches_only_that_address(tmp_path):
    """Other spellings of the start URL's address are the same host; 127.0.127.1 (which ends in
    `.127.1`), 127.0.0.2 and localhost are not, even with allow_private (a second server listens on
    127.0.127.1 at the same port to see whether the crawl went there)."""
    from sites.site import HOSTS

    server = FixtureSite()
    other = FixtureSite("127.0.127.1", server.port)
    try:
        source = CrawlSource(
            name="ips", start_urls=[f"http://127.1:{server.port}/hosts"], allow_private=True, max_depth=1
        )
        fetched = run_fetch(tmp_path, source)
    finally:
        server.close()
        other.close()
    assert not other.hits, "127.0.127.1 is another host"
    pages = {HOSTS[int(item["url"].rsplit("/", 1)[1])] for item in iter_records(fetched, "items.jsonl")
             if "/page/" in item["url"]}  # fmt: skip
    assert pages == {"0x7f.0.0.1", "2130706433", "0177.0.0.1"}
    stats = json.loads(fetched.file("crawl_stats.json").read_text())
    assert stats["tuneline/refused/offsite"] == 3
    assert "is not an allowed host (127.0.0.1; subdomains: false)" in stats["tuneline/last_error"]


@pytest.mark.parametrize(
    ("address", "private"),
    [("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.4", True), ("169.254.169.254", True),
     ("::1", True), ("fe80::1", True), ("8.8.8.8", False), ("2606:4700:4700::1111", False)],
)  # fmt: skip
def test_non_public_addresses_are_found(address, private):
    assert (non_public_address(address) is not None) is private


def test_documents_crawl_is_polite_safe_and_accounts_for_every_page(site, tmp_path):
    source = CrawlSource(name="docs", start_urls=[site.url + "/"], allow_private=True, max_depth=2)
    collected = run_collect(tmp_path / "store", [source])
    fetched = run_fetch(tmp_path / "store", source)

    assert site.hits["/private/secret"] == 0, "robots.txt disallows /private/"
    assert site.hits["/elsewhere"] == 0, "the redirect leads outside the allowed domains"
    assert site.hits["/flaky"] == 3, "500 twice, then the page"
    crawl_stats = json.loads(fetched.file("crawl_stats.json").read_text())
    # the redirect to localhost and the link to 10.255.255.1: refused by the domain rule
    assert crawl_stats["tuneline/refused/offsite"] == 2
    assert crawl_stats["robotstxt/forbidden"] == 1

    documents = list(iter_records(collected, DOCUMENTS))
    urls = {doc["url"].removeprefix(site.url) for doc in documents}
    assert {f"/page/{n}" for n in range(ARTICLES)} | {"/", "/flaky", "/faq/1"} <= urls
    article = next(doc for doc in documents if doc["url"].endswith("/page/3"))
    assert article["title"] == "Article 3" and "Article number 3" in article["text"]
    assert "Copyright" not in article["text"], "trafilatura keeps the main text only"
    assert article["source"] == "docs" and article["fetched_at"]
    raw = next(item for item in iter_records(fetched, "items.jsonl") if item["url"].endswith("/page/3"))
    assert "<footer>" in raw["html"], "raw HTML is kept for re-extraction"

    fetch_ledger = read_manifest(fetched)["ledger"]
    assert fetch_ledger["dropped"] == {"http_error": 1, "not_html": 1, "unparseable": 1}
    assert fetch_ledger["in"] == len(documents) + 3
    stats = read_stats(collected)
    assert stats["documents"] == {
        "in": len(documents) + 3,
        "out": len(documents),
        "dropped": fetch_ledger["dropped"],
    }
    assert stats["sources"]["docs"]["dropped"] == fetch_ledger["dropped"]
    rejects = [json.loads(line) for line in fetched.file("rejects.jsonl").read_text().splitlines()]
    assert {r["record"]["url"].removeprefix(site.url): r["reason"] for r in rejects} == {
        "/empty": "unparseable",
        "/download": "not_html",
        "/later": "http_error",
    }

    before = sum(site.hits.values())
    assert run_collect(tmp_path / "store", [source]) == collected, "an unchanged source is not crawled again"
    assert sum(site.hits.values()) == before

    # A changed section crawls again through the HTTP cache: pages come from it, but the 503s of
    # /later were never stored, so that page is asked for again and now answers.
    wider = run_fetch(tmp_path / "store", source.model_copy(update={"max_pages": 999}))
    assert wider.digest != fetched.digest
    assert site.hits["/later"] == 5 and site.hits["/page/3"] == 1 and site.hits["/flaky"] == 3
    assert any(item["url"].endswith("/later") for item in iter_records(wider, "items.jsonl"))


def test_sitemap_crawl_stops_at_max_pages(site, tmp_path):
    source = CrawlSource(
        name="map", sitemaps=[f"{site.url}/sitemap.xml"], max_depth=0, max_pages=3, allow_private=True
    )
    documents = list(iter_records(run_collect(tmp_path / "store", [source]), DOCUMENTS))
    assert [doc["url"].removeprefix(site.url) for doc in sorted(documents, key=lambda d: d["url"])] == [
        "/page/0", "/page/1", "/page/2",
    ]  # fmt: skip


def test_pairs_crawl_turns_faq_pages_into_conversations(site, tmp_path):
    source = CrawlSource(
        name="faq", mode="pairs", start_urls=[f"{site.url}/faq/1", f"{site.url}/faq/2", f"{site.url}/about"],
        max_depth=0, allow_private=True, pair="div.faq", question="h3", answer="p",
    )  # fmt: skip
    collected = run_collect(tmp_path / "store", [source])
    records = list(iter_records(collected))
    assert sorted(r["messages"][0]["content"] for r in records) == [
        "Can I export my data?", "How do I reset my password?", "Where is my invoice?",
    ]  # fmt: skip
    first = next(r for r in records if r["messages"][0]["content"].startswith("How"))
    assert first["messages"][1] == {
        "role": "assistant",
        "content": "Open settings and choose Reset password.",
    }
    assert first["meta"]["url"] == f"{site.url}/faq/1" and first["meta"]["source"] == "faq"
    assert first["meta"]["fetched_at"]
    assert read_manifest(collected)["ledger"] == {"in": 4, "out": 3, "dropped": {"no_pairs": 1}}


def test_pairs_with_xpath_selectors_and_no_container(site, tmp_path):
    source = CrawlSource(
        name="faq", mode="pairs", start_urls=[f"{site.url}/faq/1"], max_depth=0, allow_private=True,
        selectors="xpath", question="//div[@class='faq']/h3", answer="//div[@class='faq']/p",
    )  # fmt: skip
    records = list(iter_records(run_collect(tmp_path / "store", [source])))
    assert [r["messages"][1]["content"] for r in records] == [
        "Open settings and choose Reset password.", "Yes, use Export in the account menu.",
    ]  # fmt: skip


def test_loopback_is_refused_unless_the_source_allows_private_addresses(site, tmp_path):
    source = CrawlSource(name="local", start_urls=[site.url + "/"])
    with pytest.raises(SourceError, match=r"source 'local'.*non-public address 127\.0\.0\.1") as refused:
        run_fetch(tmp_path / "store", source)
    assert not isinstance(refused.value, SourceUnreachable), "a refusal is not worth retrying"
    assert not list((tmp_path / "store" / "stages" / "fetch").iterdir()), "no partial stage"


def test_a_site_that_stays_down_fails_naming_the_source_and_the_last_error(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = CrawlSource(name="down", start_urls=[f"http://127.0.0.1:{port}/"], allow_private=True)
    with pytest.raises(SourceUnreachable, match=r"source 'down'.*last error: .*ConnectionRefused"):
        run_collect(tmp_path / "store", [source])
    assert not (tmp_path / "store" / "stages" / "collect").exists()
    assert not list((tmp_path / "store" / "stages" / "fetch").iterdir())


def test_a_crawl_shared_by_two_processes_fetches_each_page_once_with_the_same_result(tmp_path):
    sites = {processes: FixtureSite() for processes in (1, 2)}
    stages = {}
    try:
        for processes, server in sites.items():
            source = CrawlSource(
                name="docs",
                start_urls=[server.url + "/"],
                allow_private=True,
                max_depth=3,
                processes=processes,
            )
            stages[processes] = (server.url, run_fetch(tmp_path / str(processes), source))
    finally:
        for server in sites.values():
            server.close()

    def outcome(url, stage):
        kept = sorted(item["url"].removeprefix(url) for item in iter_records(stage, "items.jsonl"))
        stats = json.loads(stage.file("crawl_stats.json").read_text())
        refused = {
            key: value
            for key, value in stats.items()
            if key.startswith(("tuneline/refused", "robotstxt/forb"))
        }
        return kept, read_manifest(stage)["ledger"], refused

    assert outcome(*stages[2]) == outcome(*stages[1])
    assert len(outcome(*stages[2])[0]) > 30
    pages = {processes: {path: n for path, n in server.hits.items() if path != "/robots.txt"}
             for processes, server in sites.items()}  # fmt: skip
    assert pages[2] == pages[1], "every page fetched once, by the process that owns it"
    assert sites[2].hits["/robots.txt"] == 2, "each process reads robots.txt itself"
    assert not (stages[2][1].dir / "processes").exists(), "the processes' own files are merged away"


def test_processes_share_one_page_budget(site, tmp_path):
    source = CrawlSource(
        name="map",
        sitemaps=[f"{site.url}/sitemap.xml"],
        max_depth=0,
        max_pages=3,
        allow_private=True,
        processes=3,
    )
    urls = [
        item["url"].removeprefix(site.url)
        for item in iter_records(run_fetch(tmp_path, source), "items.jsonl")
    ]
    assert len(urls) == 3 and set(urls) <= {"/page/0", "/page/1", "/page/2", "/faq/1"}


def test_a_failed_crawl_process_stops_the_others_at_once(tmp_path):
    from tuneline.sources.crawl import _run_processes

    folders = [tmp_path / "ok", tmp_path / "broken"]
    for folder in folders:
        folder.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    broken = [sys.executable, "-c", "import sys; print('spider exploded'); sys.exit(3)"]
    source = CrawlSource(name="docs", start_urls=["http://example.com/"], processes=2)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"(?s)source 'docs'.*exit 3.*spider exploded"):
        _run_processes(source, [sleeper, broken], folders, timeout_s=120)
    assert time.monotonic() - started < 20


def test_robots_txt_holds_for_every_request_that_waited_for_it(tmp_path):
    """Scrapy 2.19's RobotsTxtMiddleware handed the parser to the first request waiting for a
    host's robots.txt only; every later one was let through. Start URLs all wait for it at once."""
    server = FixtureSite()
    try:
        paths = ["/page/0", "/page/1", "/page/2", "/private/secret", "/private/other", "/page/3"]
        source = CrawlSource(
            name="docs", start_urls=[server.url + path for path in paths], max_depth=0, allow_private=True
        )
        fetched = run_fetch(tmp_path, source)
    finally:
        server.close()
    assert server.hits["/private/secret"] == 0 and server.hits["/private/other"] == 0
    assert json.loads(fetched.file("crawl_stats.json").read_text())["robotstxt/forbidden"] == 2


def test_the_stats_of_a_shared_crawl_add_up():
    from tuneline.sources.crawl import merge_stats

    parts = [
        {"item_scraped_count": 3, "elapsed_s": 2.5, "memusage/max": 10, "tuneline/last_error": None,
         "start_time": "2026-01-01 10:00:01", "finish_reason": "finished"},
        {"item_scraped_count": 4, "elapsed_s": 3.0, "memusage/max": 8, "tuneline/last_error": "x: refused",
         "start_time": "2026-01-01 10:00:00", "finish_reason": "finished", "retry/count": 2},
    ]  # fmt: skip
    assert merge_stats(parts) == {
        "item_scraped_count": 7, "elapsed_s": 3.0, "memusage/max": 10, "tuneline/last_error": "x: refused",
        "start_time": "2026-01-01 10:00:00", "finish_reason": "finished", "retry/count": 2,
    }  # fmt: skip


@pytest.mark.parametrize("processes", [1, 2])
def test_a_sitemap_index_is_crawled_whole(site, tmp_path, processes):
    from sites.site import SITEMAP, SITEMAP_MORE

    source = CrawlSource(
        name="maps", sitemaps=[f"{site.url}/sitemap-index.xml"], max_depth=0, allow_private=True,
        processes=processes,
    )  # fmt: skip
    items = iter_records(run_fetch(tmp_path, source), "items.jsonl")
    assert sorted(item["url"].removeprefix(site.url) for item in items) == sorted(SITEMAP + SITEMAP_MORE)


def test_pages_refused_by_robots_txt_do_not_spend_the_page_budget(tmp_path):
    """Five disallowed start URLs come first; the three allowed pages still fit in max_pages: 3."""
    server = FixtureSite()
    try:
        disallowed = [f"/private/{n}" for n in range(5)]
        allowed = ["/page/0", "/page/1", "/page/2", "/page/3"]
        source = CrawlSource(
            name="docs", start_urls=[server.url + path for path in disallowed + allowed],
            max_depth=0, max_pages=3, allow_private=True,
        )  # fmt: skip
        fetched = run_fetch(tmp_path, source)
    finally:
        server.close()
    assert not any(server.hits[path] for path in disallowed)
    assert sum(server.hits[path] for path in allowed) == 3, dict(server.hits)
    stats = json.loads(fetched.file("crawl_stats.json").read_text())
    assert stats["robotstxt/forbidden"] == 5 and stats["tuneline/budget_returned"] == 5
