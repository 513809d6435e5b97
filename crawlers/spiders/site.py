"""`site`: the one generic Tuneline spider, configured by typed arguments (crawlers.args.SiteArgs).

It starts from start URLs or sitemaps, follows links within the allowed domains (the guard
middleware enforces them) up to `max_depth` links away and `max_pages` pages in all, and yields
per page either a document (title and raw HTML; an item pipeline adds the main text) or the
question/answer pairs its selectors find. A page that cannot be fetched or read still yields an
item with `error` set, so it is dropped with a reason rather than lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urldefrag, urlsplit

import scrapy
from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    IgnoreRequest,
    ResponseDataLossError,
)
from scrapy.http import Response, TextResponse
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.sitemap import Sitemap

from crawlers.args import SiteArgs
from crawlers.items import DocumentItem, PairItem
from crawlers.middlewares import host_allowed

SPACES = re.compile(r"\s+")
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
        self.pages = 0
        self.item_class = DocumentItem if self.args.mode == "documents" else PairItem

    async def start(self) -> Any:
        for url in self.args.sitemaps:
            yield scrapy.Request(url, callback=self.parse_sitemap, errback=self.failed)
        for url in self.args.start_urls:
            if request := self.page_request(url):
                yield request

    def page_request(self, url: str) -> scrapy.Request | None:
        """A request for a page not seen yet, while the page budget lasts. Links off the allowed
        domains do not spend the budget: they are still requested, for the guard middleware to
        refuse and count."""
        if url in self.seen:
            return None
        on_site = host_allowed(urlsplit(url).hostname or "", self.domains)
        if on_site and self.pages >= self.args.max_pages:
            return None
        self.seen.add(url)
        self.pages += on_site
        return scrapy.Request(url, callback=self.parse, errback=self.failed)

    def parse_sitemap(self, response: Response) -> Iterator[scrapy.Request]:
        sitemap = Sitemap(response.body)
        for entry in sitemap:
            if sitemap.type == "sitemapindex":
                yield scrapy.Request(entry["loc"], callback=self.parse_sitemap, errback=self.failed)
            elif request := self.page_request(entry["loc"]):
                yield request

    def parse(self, response: Response) -> Iterator[Any]:
        depth = response.meta.get("depth", 0)
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
                if request := self.page_request(url):
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
            return  # refused (robots.txt, offsite, private address): counted in stats, not a page
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
            yield self.item_class(url=request.url, fetched_at=now(), depth=request.meta.get("depth", 0),
                                  error=detail)  # fmt: skip
