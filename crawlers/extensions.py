"""CrawlReport: what Tuneline reads back from a crawl besides the feed.

Every dropped item is written to TUNELINE_DROPS_PATH with its reason and URL, and the crawl's
stats (pages, refusals by reason, the last error) to TUNELINE_STATS_PATH when it closes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from scrapy import signals
from scrapy.exceptions import NotConfigured


class CrawlReport:
    """Writes dropped items and the final stats as files the caller reads after the subprocess."""

    def __init__(self, crawler, drops_path: str, stats_path: str) -> None:  # noqa: ANN001
        self.crawler = crawler
        self.stats_path = stats_path
        self.drops = open(drops_path, "w", encoding="utf-8")  # noqa: SIM115 (closed with the spider)
        crawler.signals.connect(self.item_dropped, signal=signals.item_dropped)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler):  # noqa: ANN001, ANN206
        drops_path = crawler.settings.get("TUNELINE_DROPS_PATH")
        stats_path = crawler.settings.get("TUNELINE_STATS_PATH")
        if not drops_path or not stats_path:
            raise NotConfigured("TUNELINE_DROPS_PATH and TUNELINE_STATS_PATH are not set")
        return cls(crawler, drops_path, stats_path)

    def item_dropped(self, item, response, exception) -> None:  # noqa: ANN001
        message = str(exception)
        reason = message.split(":", 1)[0].strip() or "dropped"
        row = {"reason": reason, "detail": message, "url": item.get("url"), "kind": type(item).__name__}
        self.drops.write(json.dumps(row, ensure_ascii=False) + "\n")

    def spider_closed(self, reason: str) -> None:
        self.drops.close()
        stats = {key: value for key, value in self.crawler.stats.get_stats().items()}
        stats["finish_reason"] = reason
        if isinstance(stats.get("start_time"), datetime):
            stats["elapsed_s"] = (datetime.now(UTC) - stats["start_time"]).total_seconds()
        with open(self.stats_path, "w", encoding="utf-8") as handle:
            json.dump(stats, handle, indent=2, default=str)
