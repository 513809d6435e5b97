"""Crawl sources: run the Tuneline Scrapy spider in a subprocess and read back what it found.

Scrapy's reactor cannot start twice in one process, so each crawl is `python -m scrapy crawl
site` with the source as typed spider arguments (`-a args=<json>`) and per-crawl settings as
`-s` options. The feed export writes the kept items as JSON lines; the CrawlReport extension
writes every dropped item with its reason and the crawl's stats beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.recipe import CrawlSource
from tuneline.source_errors import SourceError, SourceUnreachable

ITEMS = "items.jsonl"
DROPS = "drops.jsonl"
CRAWL_STATS = "crawl_stats.json"


@dataclass(frozen=True)
class CrawlResult:
    """Where a finished crawl left its kept items and drops, and its stats."""

    items_path: Path
    drops_path: Path
    stats: dict[str, Any]


def spider_args(source: CrawlSource) -> str:
    """The source as the spider's typed arguments: everything but the recipe's kind and name."""
    return json.dumps(source.model_dump(mode="json", exclude={"kind", "name"}))


def crawl_command(source: CrawlSource, out_dir: Path, cache_dir: Path) -> list[str]:
    """The `scrapy crawl` command line for a source; outputs go to out_dir."""
    settings = {
        "FEEDS": json.dumps({str(out_dir / ITEMS): {"format": "jsonlines", "encoding": "utf8"}}),
        "TUNELINE_DROPS_PATH": str(out_dir / DROPS),
        "TUNELINE_STATS_PATH": str(out_dir / CRAWL_STATS),
        "HTTPCACHE_DIR": str(cache_dir),
        "DEPTH_LIMIT": str(source.max_depth + 1),  # the spider stops following links at max_depth
        "CONCURRENT_REQUESTS_PER_DOMAIN": str(source.concurrency),
        "AUTOTHROTTLE_TARGET_CONCURRENCY": str(float(source.concurrency)),
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "scrapy", "crawl", "site", "-a", f"args={spider_args(source)}"]
    for key, value in settings.items():
        command += ["-s", f"{key}={value}"]
    return command


def run_crawl(source: CrawlSource, out_dir: Path, cache_dir: Path, timeout_s: float = 3600) -> CrawlResult:
    """Crawl a source into out_dir; raises SourceUnreachable when the site is down, SourceError when
    the crawl ran but kept nothing, naming the source and the last error either way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SCRAPY_SETTINGS_MODULE": "crawlers.settings"}
    try:
        done = subprocess.run(
            crawl_command(source, out_dir, cache_dir),
            capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # a retry would take as long again: not retryable
        raise SourceError(
            f"source {source.name!r}: the crawl did not finish in {timeout_s:g} s; lower max_pages "
            "or max_depth, or raise the concurrency"
        ) from None
    stats_path = out_dir / CRAWL_STATS
    if done.returncode != 0 or not stats_path.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SourceError(
            f"source {source.name!r}: the crawl process failed (exit {done.returncode}):\n{tail}"
        )
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    items_path = out_dir / ITEMS
    items_path.touch()
    kept = stats.get("item_scraped_count", 0)
    if kept == 0:
        last = stats.get("tuneline/last_error") or "no page answered with content"
        message = f"source {source.name!r}: the crawl kept no item; last error: {last}"
        if stats.get("tuneline/network_errors"):
            raise SourceUnreachable(message)
        raise SourceError(message)
    return CrawlResult(items_path, out_dir / DROPS, stats)


def crawl_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures of a crawl worth keeping in a stage's stats."""
    refused = {
        key.removeprefix("tuneline/refused/"): value
        for key, value in stats.items()
        if key.startswith("tuneline/refused/")
    }
    return {
        "pages": stats.get("response_received_count", 0),
        "items": stats.get("item_scraped_count", 0),
        "dropped": stats.get("item_dropped_count", 0),
        "refused": refused,
        "robots_forbidden": stats.get("robotstxt/forbidden", 0),
        "retries": stats.get("retry/count", 0),
        "cache_hits": stats.get("httpcache/hit", 0),
        "finish_reason": stats.get("finish_reason"),
        "last_error": stats.get("tuneline/last_error"),
    }
