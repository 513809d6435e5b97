"""Item pipelines: extract each document's main text, validate, and drop the rest with a reason.

The reason's first word (before the colon) is the key counted in the stage ledger.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import trafilatura
from scrapy import signals
from scrapy.exceptions import DropItem
from tuneline.crawlers.items import DocumentItem, PairItem

MIN_TEXT_CHARS = 20


def extract_text(html: str, url: str) -> tuple[str, str | None]:
    """Main text of a page through trafilatura (menus, banners, footers left out), or the reason
    there is none. Metadata extraction (dates, authors) is off: it cost more than the text."""
    try:
        doc = trafilatura.bare_extraction(html, url=url, fast=True)
    except Exception as error:  # noqa: BLE001 - any parser failure becomes the drop reason
        return "", f"unparseable: {type(error).__name__}: {error}"
    if doc is None:
        return "", "unparseable: trafilatura found no content"
    return doc.text or "", None


class ExtractTextPipeline:
    """Adds `text` to documents, in worker processes so the crawl goes on while pages are parsed
    (about a fifth of a page's CPU). TUNELINE_EXTRACT_WORKERS sets how many; 0 extracts in the
    crawl process."""

    def __init__(self, crawler: Any, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        crawler.signals.connect(self.shutdown, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> ExtractTextPipeline:
        default = max(1, min(4, (os.cpu_count() or 2) - 1))
        return cls(crawler, crawler.settings.getint("TUNELINE_EXTRACT_WORKERS", default))

    async def process_item(self, item: Any) -> Any:
        if not isinstance(item, DocumentItem) or item.get("error"):
            return item
        if self.workers == 0:
            item["text"], error = extract_text(item["html"], item["url"])
        else:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers)
            loop = asyncio.get_running_loop()
            item["text"], error = await loop.run_in_executor(
                self.pool, extract_text, item["html"], item["url"]
            )
        if error:
            item["error"] = error
        return item

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class ValidatePipeline:
    """Keep documents with main text and pairs with both halves; drop anything else with why."""

    def process_item(self, item: Any) -> Any:
        if item.get("error"):
            raise DropItem(item["error"])
        if isinstance(item, DocumentItem):
            text = (item.get("text") or "").strip()
            if len(text) < MIN_TEXT_CHARS:
                raise DropItem(f"no_text: {len(text)} characters of main text (fewer than {MIN_TEXT_CHARS})")
        elif isinstance(item, PairItem):
            if not (item.get("question") or "").strip():
                raise DropItem("empty_question: the question selector matched no text")
            if not (item.get("answer") or "").strip():
                raise DropItem("empty_answer: the answer selector matched no text")
        return item
