"""`site`: the one generic Tuneline spider, configured by typed arguments (tuneline.crawlers.args.SiteArgs).

It starts from start URLs or sitemaps, follows links within the allowed domains (the guard
middleware enforces them) up to `max_depth` links away and `max_pages` pages in all, and yields
per page either a document (title and raw HTML; an item pipeline adds the main text) or the
question/answer pairs its selectors find. A page that cannot be fetched or read still yields an
item with `error` set, so it is dropped with a reason rather than lost.

With `processes` above 1 (and a frontier folder from tuneline.sources.crawl), several of these spiders
share one crawl: each fetches the URLs it owns and hands the others over (tuneline.crawlers.frontier).
With a Redis namespace (the source's `redis_url`), processes on any number of hosts share one queue,
seen-set and page budget in Redis instead (tuneline.crawlers.shared).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import scrapy
from scrapy import signals
from scrapy.exceptions import (
    CannotResolveHostError,
    DontCloseSpider,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    IgnoreRequest,
    ResponseDataLossError,
)
from scrapy.http import Response, TextResponse
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.sitemap import Sitemap
from tuneline.crawlers.args import SiteArgs
from tuneline.crawlers.frontier import BUDGET, Frontier, PageBudget
from tuneline.crawlers.items import DocumentItem, PairItem
from tuneline.crawlers.middlewares import host_allowed
from tuneline.crawlers.shared import SharedCrawl, connect
from twisted.internet.task import LoopingCall

SPACES = re.compile(r"\s+")
# Links followed from a start URL or a sitemap's page. Not Scrapy's `depth`, which also counts
# the sitemaps an index leads through, and which a page handed over by another process restarts.
LINK_DEPTH = "tuneline_link_depth"
# Set on a request that took a page from the budget: refused before it was fetched, it gives it back.
BUDGETED = "tuneline_budgeted"
# Failures another try may fix; Scrapy's own retries have already been spent on them.
NETWORK_ERRORS = (
    CannotResolveHostError, DownloadConnectionRefusedError, DownloadFailedError,
    DownloadTimeoutError, ResponseDataLossError, OSError,
)  # fmt: skip


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def clean_text(parts: list[str]) -> str:
    """Text nodes joined with single spaces."""
    return SPACES.sub(" ", " ".join(parts)).strip()


class SiteSpider(scrapy.Spider):
    """Crawl one site into documents or question/answer pairs."""

    name = "site"

    def __init__(self, args: str = "{}", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.args = SiteArgs.model_validate_json(args)
        self.allow = [re.compile(pattern) for pattern in self.args.allow]
        self.deny = [re.compile(pattern) for pattern in self.args.deny]
        self.domains = self.args.domains()
        self.seen: set[str] = set()
        # Pages found while the budget was taken by requests not yet fetched: if robots.txt or the
        # guard refuses some of those, these get their pages, in the order they were found.
        self.waiting: deque[tuple[str, int]] = deque()
        self.budget = PageBudget(self.args.max_pages)
        self.frontier: Frontier | None = None
        self.shared: SharedCrawl | None = None
        self.item_class = DocumentItem if self.args.mode == "documents" else PairItem

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> SiteSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        folder = crawler.settings.get("TUNELINE_FRONTIER_DIR")
        if folder and spider.args.processes > 1:
            spider.share_crawl(Path(folder), crawler.settings.getint("TUNELINE_PROCESS"))
        if namespace := crawler.settings.get("TUNELINE_REDIS_NAMESPACE"):
            settings = crawler.settings
            server = connect(settings.get("REDIS_URL"), settings.getdict("REDIS_PARAMS").get("password"))
            process_id = settings.get("TUNELINE_PROCESS_ID")
            spider.share_through_redis(SharedCrawl(server, namespace, process_id, spider.args.max_pages))
        return spider

    def share_crawl(self, folder: Path, index: int) -> None:
        """Crawl the pages this process owns and trade links with the others (tuneline.crawlers.frontier)."""
        self.frontier = Frontier(folder, index, self.args.processes)
        self.budget = PageBudget(self.args.max_pages, folder / BUDGET)
        self.poller = LoopingCall(self.poll)
        self.crawler.signals.connect(self.on_idle, signal=signals.spider_idle)
        self.crawler.signals.connect(self.on_opened, signal=signals.spider_opened)
        self.crawler.signals.connect(self.on_closed, signal=signals.spider_closed)

    def share_through_redis(self, shared: SharedCrawl) -> None:
        """Take pages from the queue all processes share, and stay open until none of them is busy."""
        self.shared = shared
        self.budget = shared
        self.crawler.signals.connect(self.on_opened_shared, signal=signals.spider_opened)
        self.crawler.signals.connect(self.on_idle_shared, signal=signals.spider_idle)

    def on_opened_shared(self) -> None:
        self.shared.set_busy(True)  # before the first start URL: peers must not end the crawl meanwhile
        # An idle engine looks at its scheduler again on a heartbeat, every 5 s by default: pages that
        # peers queue meanwhile would wait that long. 0.1 s costs one ZCARD a tick.
        self.crawler.engine._SLOT_HEARTBEAT_INTERVAL = 0.1

    def on_idle_shared(self) -> None:
        """Nothing to do here: take waiting pages the budget has room for again, else stay open
        while the queue has pages or another process is busy (it may queue more)."""
        if requests := self.waiting_requests():
            self.shared.set_busy(True)
            for request in requests:
                self.crawler.engine.crawl(request)
            raise DontCloseSpider
        self.shared.set_busy(False)
        if not self.shared.finished():
            raise DontCloseSpider

    def owns(self, url: str) -> bool:
        return self.frontier is None or self.frontier.owns(url)

    async def start(self) -> Any:
        for url in self.args.sitemaps:
            if self.owns(url):
                yield scrapy.Request(url, callback=self.parse_sitemap, errback=self.failed)
        for url in self.args.start_urls:
            if request := self.page_request(url, depth=0):
                yield request

    def page_request(self, url: str, depth: int) -> scrapy.Request | None:
        """A request for a page not seen yet, while the page budget lasts (else the page waits
        for a page given back); a URL another process owns is handed over to it. Links off the
        allowed domains do not spend the budget: they are still requested, for the guard middleware
        to refuse and count."""
        if url in self.seen:
            return None
        if not self.owns(url):
            self.frontier.hand_over(url, depth)
            return None
        self.seen.add(url)
        if self.shared is not None and not self.shared.first_sight(scrapy.Request(url)):
            return None  # another process has it
        if not host_allowed(urlsplit(url).hostname or "", self.domains, self.args.subdomains):
            return self.request(url, depth, budgeted=False)
        if not self.budget.claim():
            self.waiting.append((url, depth))
            return None
        return self.request(url, depth, budgeted=True)

    def request(self, url: str, depth: int, *, budgeted: bool) -> scrapy.Request:
        return scrapy.Request(
            url, callback=self.parse, errback=self.failed, meta={LINK_DEPTH: depth, BUDGETED: budgeted},
            dont_filter=self.shared is not None,  # already checked against the crawl's seen-set
        )  # fmt: skip

    def waiting_requests(self) -> list[scrapy.Request]:
        """Requests for waiting pages, as many as the budget has pages again."""
        requests = []
        while self.waiting and self.budget.claim():
            requests.append(self.request(*self.waiting.popleft(), budgeted=True))
        return requests

    def schedule_received(self) -> bool:
        """Queue the pages peers handed over; whether any was new (the process is busy again)."""
        requests = [self.page_request(url, depth) for url, depth in self.frontier.receive()]
        for request in [*filter(None, requests), *self.waiting_requests()]:
            self.crawler.engine.crawl(request)
            self.frontier.idle = False
        return not self.frontier.idle

    def poll(self) -> None:
        """Every 50 ms: take the peers' links, tell them how things stand, close once all are done."""
        self.schedule_received()
        self.frontier.report()
        if self.frontier.idle and self.frontier.finished():
            self.poller.stop()
            deferred_from_coro(self.crawler.engine.close_spider_async(reason="finished"))

    def on_opened(self) -> None:
        self.poller.start(0.05)  # its Deferred fires when it stops: not the signal's to wait for

    def on_idle(self) -> None:
        """Nothing left here: stay open while peers may still hand pages over."""
        self.frontier.idle = True
        if self.schedule_received():
            raise DontCloseSpider
        self.frontier.report()
        if not self.frontier.finished():
            raise DontCloseSpider

    def on_closed(self) -> None:
        if self.poller.running:
            self.poller.stop()
        self.frontier.close()

    def parse_sitemap(self, response: Response) -> Iterator[scrapy.Request]:
        sitemap = Sitemap(response.body)
        for entry in sitemap:
            if sitemap.type == "sitemapindex":  # only the owner of the index reads it: all its sitemaps
                yield scrapy.Request(entry["loc"], callback=self.parse_sitemap, errback=self.failed)
            elif request := self.page_request(entry["loc"], depth=0):  # listed pages start the crawl
                yield request

    def parse(self, response: Response) -> Iterator[Any]:
        depth = response.meta.get(LINK_DEPTH, 0)
        base = {"url": response.url, "fetched_at": now(), "depth": depth}
        if not isinstance(response, TextResponse):
            yield self.item_class(
                **base, error=f"not_html: {response.headers.get('Content-Type', b'').decode()}"
            )
            return
        if self.args.mode == "documents":
            yield self.document(response, base)
        else:
            yield from self.pairs(response, base)
        if depth < self.args.max_depth:
            for url in self.link_urls(response):
                if request := self.page_request(url, depth + 1):
                    yield request

    def link_urls(self, response: TextResponse) -> Iterator[str]:
        """Absolute http(s) URLs of the page's links, without fragments, passing allow and deny.

        Cheaper than LinkExtractor (a third of the crawl's parse time here), and it does not
        filter hosts: the guard middleware decides that, by host without port.
        """
        for href in response.css("a::attr(href)").getall():
            url = urldefrag(response.urljoin(href.strip())).url
            if not url.startswith(("http://", "https://")):
                continue
            if self.allow and not any(pattern.search(url) for pattern in self.allow):
                continue
            if any(pattern.search(url) for pattern in self.deny):
                continue
            yield url

    def document(self, response: TextResponse, base: dict[str, Any]) -> DocumentItem:
        """The page with its title; ExtractTextPipeline adds the main text."""
        title = clean_text(response.css("title::text").getall()) or clean_text(
            response.css("h1 ::text").getall()
        )
        return DocumentItem(**base, title=title, html=response.text)

    def select(self, node: Any, query: str) -> Any:
        return node.css(query) if self.args.selectors == "css" else node.xpath(query)

    def texts(self, node: Any, query: str) -> list[str]:
        return [clean_text(element.xpath(".//text()").getall()) for element in self.select(node, query)]

    def pairs(self, response: TextResponse, base: dict[str, Any]) -> Iterator[PairItem]:
        title = clean_text(response.css("title::text").getall())
        if self.args.pair:
            found = [
                (
                    " ".join(self.texts(block, self.args.question)),
                    " ".join(self.texts(block, self.args.answer)),
                )
                for block in self.select(response, self.args.pair)
            ]
        else:
            questions = self.texts(response, self.args.question)
            answers = self.texts(response, self.args.answer)
            if len(questions) != len(answers):
                yield PairItem(
                    **base, title=title,
                    error=f"pair_mismatch: {len(questions)} questions but {len(answers)} answers",
                )  # fmt: skip
                return
            found = list(zip(questions, answers, strict=True))
        if not found:
            yield PairItem(**base, title=title, error="no_pairs: the selectors matched nothing on this page")
        for question, answer in found:
            yield PairItem(**base, title=title, question=question, answer=answer)

    def failed(self, failure: Any) -> Iterator[Any]:
        """A page that could not be fetched: an item with the error, unless the guard refused it."""
        request = failure.request
        error = failure.value
        if isinstance(error, IgnoreRequest) and not isinstance(error, HttpError):
            # Refused (robots.txt, offsite, private address): counted in stats, not a page, and
            # never fetched, so its page goes back to the budget for the next page found.
            if request.meta.get(BUDGETED):
                self.budget.release()
                self.crawler.stats.inc_value("tuneline/budget_returned")
                yield from self.waiting_requests()
            return
        if isinstance(error, HttpError):
            detail = f"http_error: HTTP {error.response.status}"
        else:
            detail = f"fetch_error: {type(error).__name__}: {error}"
        self.crawler.stats.set_value("tuneline/last_error", f"{request.url}: {detail}")
        if isinstance(error, NETWORK_ERRORS) or (
            isinstance(error, HttpError) and error.response.status >= 500
        ):
            self.crawler.stats.inc_value("tuneline/network_errors")
        if request.callback == self.parse:
            yield self.item_class(url=request.url, fetched_at=now(), depth=request.meta.get(LINK_DEPTH, 0),
                                  error=detail)  # fmt: skip
