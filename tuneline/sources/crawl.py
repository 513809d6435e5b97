"""Crawl sources: run the Tuneline Scrapy spider in a subprocess and read back what it found.

Scrapy's reactor cannot start twice in one process, so each crawl is `python -m scrapy crawl
site` with the source as typed spider arguments (`-a args=<json>`) and per-crawl settings as
`-s` options. The feed export writes the kept items as JSON lines; the CrawlReport extension
writes every dropped item with its reason and the crawl's stats beside it.

A source with `processes: N` runs N such processes on one site, each fetching the pages it owns
(tuneline.crawlers.frontier); their items, drops, logs and stats are merged into the same files.
A source with a `redis_url` shares its queue, seen-set and page budget through Redis instead
(tuneline.crawlers.shared, tuneline.sources.shared_crawl), with the processes of every host
running it; each host's fetch stage gets the items of all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tuneline.recipe import CrawlSource
from tuneline.sources import shared_crawl as shared
from tuneline.sources.errors import SourceError, SourceUnreachable

ITEMS = "items.jsonl"
DROPS = "drops.jsonl"
CRAWL_STATS = "crawl_stats.json"
LOG = "crawl.log"


@dataclass(frozen=True)
class CrawlResult:
    """Where a finished crawl left its kept items and drops, and its stats."""

    items_path: Path
    drops_path: Path
    stats: dict[str, Any]


# A shared crawl's Redis password: from the environment, never the recipe (redis-cli's variable).
REDIS_PASSWORD_ENV = "REDISCLI_AUTH"

# A refresh asks the site again for every page it has cached (If-None-Match / If-Modified-Since
# from the cached page's ETag and Last-Modified, through Scrapy's RFC 2616 cache policy and a
# `max-age=0` request): a 304 reuses the cached page, anything else is fetched anew. A plain crawl
# trusts its cache for a day (settings.py).
REVALIDATE_SETTINGS = {
    "HTTPCACHE_POLICY": "scrapy.extensions.httpcache.RFC2616Policy",
    "HTTPCACHE_ALWAYS_STORE": "True",  # pages without validators too (they are simply fetched again)
    "DEFAULT_REQUEST_HEADERS": json.dumps(
        {
            "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # Scrapy's
            "Accept-Language": "en",
            "Cache-Control": "max-age=0",
        }
    ),
}


def spider_args(source: CrawlSource) -> str:
    """The source as the spider's typed arguments: everything but the recipe's kind and name."""
    return json.dumps(source.model_dump(mode="json", exclude={"kind", "name", "redis_url"}))


def crawl_command(
    source: CrawlSource,
    out_dir: Path,
    cache_dir: Path,
    process: int = 0,
    frontier: Path | None = None,
    revalidate: bool = False,
    redis_process: tuple[str, str] | None = None,
) -> list[str]:
    """The `scrapy crawl` command line for a source (or, with a frontier folder, for one of its
    processes); outputs go to out_dir. The per-domain concurrency is shared by the processes.
    `revalidate` (a refresh) asks the site whether each cached page changed. `redis_process`
    (namespace, process id): a process of a crawl shared through Redis."""
    concurrency = -(-source.concurrency // source.processes)
    settings = {
        "FEEDS": json.dumps({str(out_dir / ITEMS): {"format": "jsonlines", "encoding": "utf8"}}),
        "TUNELINE_DROPS_PATH": str(out_dir / DROPS),
        "TUNELINE_STATS_PATH": str(out_dir / CRAWL_STATS),
        "HTTPCACHE_DIR": str(cache_dir),
        "CONCURRENT_REQUESTS_PER_DOMAIN": str(concurrency),
        # AutoThrottle reads the process's own event-loop lag as the site's latency; aiming each
        # process at its share would throttle a busy crawl below the cap shared above.
        "AUTOTHROTTLE_TARGET_CONCURRENCY": str(float(source.concurrency)),
        # Text extraction in worker processes only where a core is left over: when the crawl
        # processes fill the machine, shipping pages to workers costs more than it saves.
        "TUNELINE_EXTRACT_WORKERS": str(max(0, min(4, (os.cpu_count() or 1) - source.processes))),
        "LOG_LEVEL": "WARNING",
    }
    if frontier is not None:
        settings |= {"TUNELINE_FRONTIER_DIR": str(frontier), "TUNELINE_PROCESS": str(process)}
    if revalidate:
        settings |= REVALIDATE_SETTINGS
    if redis_process is not None:
        namespace, process_id = redis_process
        settings |= {
            "SCHEDULER": "tuneline.crawlers.shared.SharedScheduler",
            "SCHEDULER_PERSIST": "True",  # scrapy-redis would empty the queue when any process ends
            "SCHEDULER_QUEUE_KEY": f"{namespace}:requests",
            "SCHEDULER_DUPEFILTER_KEY": f"{namespace}:seen",
            "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
            "TUNELINE_REDIS_NAMESPACE": namespace,
            "TUNELINE_PROCESS_ID": process_id,
            # SharedConcurrencyMiddleware caps the whole crawl; any process may use every slot. A
            # request waits for its slot after it left the shared queue: a process that took more
            # than `concurrency` would keep them from idle peers (on a slow site one process took
            # every page while the other had none).
            "CONCURRENT_REQUESTS_PER_DOMAIN": str(source.concurrency),
            "CONCURRENT_REQUESTS": str(source.concurrency),
        }
    command = [sys.executable, "-m", "scrapy", "crawl", "site", "-a", f"args={spider_args(source)}"]
    for key, value in settings.items():
        command += ["-s", f"{key}={value}"]
    return command


def run_crawl(
    source: CrawlSource,
    out_dir: Path,
    cache_dir: Path,
    timeout_s: float = 3600,
    revalidate: bool = False,
    digest: str = "",
) -> CrawlResult:
    """Crawl a source into out_dir; raises SourceUnreachable when the site is down, SourceError when
    the crawl ran but kept nothing, naming the source and the last error either way.

    With `processes` > 1 each process writes to a folder of its own (its HTTP cache too, keyed by
    the process count, as the pages a process owns depend on it); the results are merged here.
    `revalidate` (a refresh): cached pages are checked with the site, not trusted for a day.
    With `redis_url` the crawl is shared through Redis under the fetch stage's `digest`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.redis_url:
        stats = run_shared_crawl(source, out_dir, cache_dir, timeout_s, revalidate, digest)
    elif source.processes == 1:
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = crawl_command(source, out_dir, cache_dir, revalidate=revalidate)
        _run_processes(source, [command], [out_dir], timeout_s)
        stats = json.loads((out_dir / CRAWL_STATS).read_text(encoding="utf-8"))
    else:
        work = out_dir / "processes"
        shutil.rmtree(work, ignore_errors=True)  # a retry starts the frontier afresh
        frontier = work / "frontier"
        frontier.mkdir(parents=True)
        folders = [work / str(index) for index in range(source.processes)]
        commands = []
        for index, folder in enumerate(folders):
            folder.mkdir()
            cache = cache_dir / f"{index}-of-{source.processes}"
            cache.mkdir(parents=True, exist_ok=True)
            commands.append(crawl_command(source, folder, cache, index, frontier, revalidate))
        _run_processes(source, commands, folders, timeout_s)
        stats = merge_stats([json.loads((f / CRAWL_STATS).read_text(encoding="utf-8")) for f in folders])
        merge_files(folders, out_dir, (ITEMS, DROPS, LOG))
        (out_dir / CRAWL_STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")
        shutil.rmtree(work)
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


def merge_files(folders: list[Path], out_dir: Path, names: tuple[str, ...]) -> None:
    """Each named file of out_dir: the processes' files of that name, one after another."""
    for name in names:
        with open(out_dir / name, "wb") as merged:
            for folder in folders:
                if (folder / name).is_file():
                    with open(folder / name, "rb") as part:
                        shutil.copyfileobj(part, merged)


def shown_url(url: str) -> str:
    """A Redis URL as it may be shown: without its password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def connect_redis(source: CrawlSource) -> redis.Redis:
    """The source's Redis, answering; else an error naming the source, the field and the fix."""
    try:
        return shared.connect(source.redis_url, os.environ.get(REDIS_PASSWORD_ENV))
    except (redis.RedisError, ValueError, OSError) as error:
        raise SourceUnreachable(
            f"source {source.name!r}: redis_url {shown_url(source.redis_url)} does not answer "
            f"({type(error).__name__}: {error}); start Redis there, fix redis_url (redis://HOST:6379/0 "
            f"or unix:///path/to/redis.sock) or set {REDIS_PASSWORD_ENV} to its password, or remove "
            "redis_url to crawl on this machine alone"
        ) from None


def run_shared_crawl(
    source: CrawlSource, out_dir: Path, cache_dir: Path, timeout_s: float, revalidate: bool, digest: str
) -> dict[str, Any]:
    """This host's processes of a crawl shared through Redis; once every process of every host
    has uploaded its results, all of them are written to out_dir. Returns the merged stats."""
    server = connect_redis(source)
    namespace = shared.namespace_of(digest)
    work = out_dir / "processes"
    shutil.rmtree(work, ignore_errors=True)
    folders = [work / str(index) for index in range(source.processes)]
    process_ids = [uuid.uuid4().hex for _ in folders]
    commands = []
    for index, (folder, process_id) in enumerate(zip(folders, process_ids, strict=True)):
        folder.mkdir(parents=True)
        # Which process fetches a page changes from crawl to crawl: one cache per local process
        # slot still serves a retry on this host most of its pages.
        cache = cache_dir / f"shared-{index}"
        cache.mkdir(parents=True, exist_ok=True)
        commands.append(crawl_command(source, folder, cache, revalidate=revalidate,
                                      redis_process=(namespace, process_id)))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        _run_processes(source, commands, folders, timeout_s, {"TUNELINE_REDIS_URL": source.redis_url})
    except SourceError:
        shared.abandon(server, namespace, process_ids)  # peers need not wait for them
        raise
    for folder, process_id in zip(folders, process_ids, strict=True):
        shared.upload_results(
            server, namespace, process_id,
            _lines(folder / ITEMS), _lines(folder / DROPS),
            json.loads((folder / CRAWL_STATS).read_text(encoding="utf-8")),
        )  # fmt: skip
    while not shared.results_ready(server, namespace):  # processes on other hosts
        if time.monotonic() > deadline:
            raise SourceError(
                f"source {source.name!r}: processes of the shared crawl on other hosts did not finish "
                f"in {timeout_s:g} s; lower max_pages or max_depth"
            )
        time.sleep(0.2)
    items, drops, parts = shared.read_results(server, namespace)
    (out_dir / ITEMS).write_bytes(b"".join(line + b"\n" for line in items))
    (out_dir / DROPS).write_bytes(b"".join(line + b"\n" for line in drops))
    merge_files(folders, out_dir, (LOG,))
    stats = merge_stats(parts) | {"tuneline/shared_processes": len(parts)}
    (out_dir / CRAWL_STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")
    shutil.rmtree(work)
    if not stats.get("item_scraped_count"):
        shared.forget(server, namespace)  # a retry crawls afresh instead of reading nothing again
    return stats


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.is_file() else []


def _run_processes(
    source: CrawlSource,
    commands: list[list[str]],
    folders: list[Path],
    timeout_s: float,
    env_extra: dict[str, str] | None = None,
) -> None:
    """Run the crawl's processes side by side; the first to fail (or the clock) stops them all."""
    env = {**os.environ, "SCRAPY_SETTINGS_MODULE": "tuneline.crawlers.settings", **(env_extra or {})}
    logs = [folder / LOG for folder in folders]
    running = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "wb") as handle:
            running.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout_s
    failed: list[int] = []
    try:
        while None in (codes := [process.poll() for process in running]):
            if failed := [index for index, code in enumerate(codes) if code not in (None, 0)]:
                break
            if time.monotonic() > deadline:  # a retry would take as long again: not retryable
                raise SourceError(
                    f"source {source.name!r}: the crawl did not finish in {timeout_s:g} s; lower "
                    "max_pages or max_depth, or raise the concurrency"
                )
            time.sleep(0.05)
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index in failed or range(len(running)):
        if running[index].returncode != 0 or not (folders[index] / CRAWL_STATS).is_file():
            tail = "\n".join(logs[index].read_text(errors="replace").strip().splitlines()[-15:])
            code = running[index].returncode
            raise SourceError(f"source {source.name!r}: the crawl process failed (exit {code}):\n{tail}")


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One crawl's stats from its processes': counts added up, peaks and the elapsed time the
    largest, the first start time and the first last error kept."""
    merged: dict[str, Any] = {}
    for stats in parts:
        for key, value in stats.items():
            known = merged.get(key)
            if known is None or value is None:  # a process that never set it
                merged[key] = value if known is None else known
            elif key == "elapsed_s" or key.endswith("max"):
                merged[key] = max(merged[key], value)
            elif key == "start_time":
                merged[key] = min(merged[key], value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                merged[key] = merged[key] + value
    reasons = sorted({str(stats.get("finish_reason")) for stats in parts})
    merged["finish_reason"] = ", ".join(reasons)
    return merged


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
