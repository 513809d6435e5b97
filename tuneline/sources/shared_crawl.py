"""The tuneline side of a crawl shared through Redis: where its keys live, and its results.

The crawl processes (tuneline.crawlers.shared) share the queue, seen-set and page budget; when this
host's processes end, their kept items, drops and stats are uploaded here in one transaction, and
every host reads the results of all processes once each process that joined has uploaded (or
stopped beating: killed, its host lost). The crawl's keys expire KEY_TTL_S after the last sign of
life, so a host started just after the end still finds the results instead of crawling again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

# As in tuneline.crawlers.shared (the crawl processes' side), which this package does not import:
# the stages that read sources must not depend on the Scrapy project.
KEY_TTL_S = 600
STALE_S = 120.0
KEYS = ("requests", "seen", "budget", "processes", "beats", "uploaded", "items", "drops", "stats")


def namespace_of(digest: str) -> str:
    """The prefix of every key of the crawl written by the fetch stage with this digest."""
    return f"tuneline:crawl:{digest}"


def connect(url: str, password: str | None) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://), checked with a PING."""
    server = redis.Redis.from_url(url, password=password, socket_connect_timeout=10, socket_timeout=30)
    server.ping()
    return server


def upload_results(
    server: redis.Redis, namespace: str, process_id: str, items: Iterable[bytes], drops: Iterable[bytes],
    stats: dict[str, Any],
) -> None:  # fmt: skip
    """Add one finished process's kept items, drops and stats to the crawl's results, at once."""
    with server.pipeline(transaction=True) as pipe:
        for line in items:
            pipe.rpush(f"{namespace}:items", line)
        for line in drops:
            pipe.rpush(f"{namespace}:drops", line)
        pipe.rpush(f"{namespace}:stats", json.dumps(stats))
        pipe.hset(f"{namespace}:processes", process_id, "closed")
        pipe.hset(f"{namespace}:uploaded", process_id, 1)
        for name in KEYS:
            pipe.expire(f"{namespace}:{name}", KEY_TTL_S)
        pipe.execute()


def results_ready(server: redis.Redis, namespace: str) -> bool:
    """Whether every process that joined the crawl (and still lives or has uploaded) has uploaded."""
    with server.pipeline(transaction=True) as pipe:
        pipe.hkeys(f"{namespace}:processes")
        pipe.hkeys(f"{namespace}:uploaded")
        pipe.zrange(f"{namespace}:beats", 0, -1, withscores=True)
        pipe.time()  # Redis's clock, the one the processes' beats are on
        joined, uploaded, beats, (seconds, _) = pipe.execute()
    alive = {member for member, at in beats if at > seconds - STALE_S}
    return all(member in uploaded or member not in alive for member in joined)


def read_results(
    server: redis.Redis, namespace: str
) -> tuple[list[bytes], list[bytes], list[dict[str, Any]]]:
    """The kept items and drops (JSON lines) and the stats of every process of the crawl."""
    with server.pipeline(transaction=True) as pipe:
        for name in ("items", "drops", "stats"):
            pipe.lrange(f"{namespace}:{name}", 0, -1)
        items, drops, stats = pipe.execute()
    return items, drops, [json.loads(part) for part in stats]


def abandon(server: redis.Redis, namespace: str, process_ids: list[str]) -> None:
    """Processes that failed: neither busy nor alive, so no peer waits for them (the pages they
    had taken from the queue are lost to this crawl)."""
    with server.pipeline(transaction=True) as pipe:
        for process_id in process_ids:
            pipe.hset(f"{namespace}:processes", process_id, "failed")
            pipe.zrem(f"{namespace}:beats", process_id)
        pipe.execute()


def forget(server: redis.Redis, namespace: str) -> None:
    """Delete a crawl's keys (a crawl that kept nothing: its retry starts afresh)."""
    server.delete(*(f"{namespace}:{name}" for name in KEYS))
