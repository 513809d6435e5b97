"""One site's crawl shared through Redis by Scrapy processes on any number of hosts (`redis_url`).

scrapy-redis's scheduler keeps the request queue in Redis and its RFPDupeFilter the seen-set, so
every process takes its next page from the one queue all of them fill, and a URL found by two
processes is queued once. Around them, Tuneline keeps in Redis what must hold for the whole crawl:

- the page budget (`max_pages`): a counter claimed by a Lua script before a page is queued and
  given back when robots.txt or the guard refuses it, so it holds across processes and hosts;
- the per-domain concurrency (`concurrency`): a request takes a lease on its host's slots in Redis
  right before it is downloaded and gives it back with the response (SharedConcurrencyMiddleware);
  leases expire, so a process that dies cannot hold slots forever;
- when the crawl is over: each process says whether it is busy; the crawl is over when the queue
  is empty and no live process is busy, read in one transaction (a process marks itself busy
  before it takes a request, so a page in flight is always seen in one place or the other);
- the results: each host's `tuneline` process uploads the kept items, drops and stats of its own
  crawl processes when they end, and every host reads all of them once every process has
  (tuneline.sources.shared_crawl).

Keys live under `tuneline:crawl:<fetch stage digest>:`, so two crawls never mix, and expire
KEY_TTL_S after the last sign of life of any process.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import redis
from scrapy.exceptions import NotConfigured
from scrapy.utils.httpobj import urlparse_cached
from scrapy_redis.dupefilter import RFPDupeFilter
from scrapy_redis.scheduler import Scheduler

# How long a crawl's keys outlive its last heartbeat: long enough for every host to read the results
# (and for a host started just after the end to find them), short enough not to hoard pages.
KEY_TTL_S = 600
# A process that has not beaten for this long is gone (killed or its host lost): not waited for.
# Generous: a process beats from its event loop, which one long page parse can hold up.
STALE_S = 120.0
BEAT_EVERY_S = 1.0
# The crawl's keys (after `tuneline:crawl:<digest>:`); tuneline.sources.shared_crawl, which
# uploads and reads the results in the tuneline process, names the same ones.
FRONTIER_KEYS = ("requests", "seen", "budget", "processes", "beats")
RESULT_KEYS = ("uploaded", "items", "drops", "stats")

# Take one page from the budget unless it is spent: read and increment in one step.
CLAIM = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
return 1
"""

# Take one of a host's slots unless all are leased; a lease not given back expires (ARGV[3] s).
# Redis's clock, not the hosts': theirs may differ.
LEASE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 60)
return 1
"""
LEASE_META = "tuneline_slot_lease"
# How often a request waiting for a slot asks again: latency against Redis round trips.
LEASE_POLL_S = 0.02


def redis_now(server: redis.Redis) -> float:
    """Redis's clock: the one clock all hosts of a crawl agree on."""
    seconds, microseconds = server.time()
    return seconds + microseconds / 1e6


def connect(url: str, password: str | None) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://), checked with a PING."""
    server = redis.Redis.from_url(url, password=password, socket_connect_timeout=10, socket_timeout=30)
    server.ping()
    return server


class SharedCrawl:
    """This process's view of a crawl shared through Redis: its budget, seen-set and state."""

    def __init__(self, server: redis.Redis, namespace: str, process_id: str, max_pages: int) -> None:
        self.server = server
        self.namespace = namespace
        self.process_id = process_id
        self.max_pages = max_pages
        self.dupefilter = RFPDupeFilter(server, key=self.key("seen"))
        self.claim_script = server.register_script(CLAIM)
        self.busy = False
        self.last_beat = 0.0

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def first_sight(self, request: Any) -> bool:
        """Whether no process of the crawl has seen this request before (and now it has)."""
        return not self.dupefilter.request_seen(request)

    def claim(self) -> bool:
        """Take one page from the crawl's budget; False once it is spent."""
        return bool(self.claim_script(keys=[self.key("budget")], args=[self.max_pages]))

    def release(self) -> None:
        """Give back a page that was never fetched."""
        self.server.decr(self.key("budget"))

    def set_busy(self, busy: bool) -> None:
        """Tell the other processes whether this one has work in hand."""
        if busy != self.busy:
            self.busy = busy
            self.server.hset(self.key("processes"), self.process_id, "busy" if busy else "idle")
        self.beat()

    def beat(self) -> None:
        """At most once a second: this process lives, and so do the crawl's keys."""
        if time.monotonic() - self.last_beat < BEAT_EVERY_S:
            return
        self.last_beat = time.monotonic()
        with self.server.pipeline() as pipe:
            pipe.zadd(self.key("beats"), {self.process_id: redis_now(self.server)})
            for name in FRONTIER_KEYS + RESULT_KEYS:
                pipe.expire(self.key(name), KEY_TTL_S)
            pipe.execute()

    def finished(self) -> bool:
        """Whether the queue is empty and no live process is busy, read in one transaction."""
        with self.server.pipeline(transaction=True) as pipe:
            pipe.zcard(self.key("requests"))
            pipe.hgetall(self.key("processes"))
            pipe.zrange(self.key("beats"), 0, -1, withscores=True)
            pipe.time()
            queued, states, beats, (seconds, _) = pipe.execute()
        alive = {member for member, at in beats if at > seconds - STALE_S}
        busy = [member for member, state in states.items() if state == b"busy" and member in alive]
        return queued == 0 and not busy


class SharedScheduler(Scheduler):
    """scrapy-redis's scheduler, marking this process busy before it takes a request from the queue
    (so a request is never out of the queue while its process looks idle) and keeping the queue
    and seen-set when a process closes (its peers still use them; they expire with the crawl).

    Its two counting methods are rewritten only to drop the `spider` argument scrapy-redis 0.9.1
    still passes to the stats (deprecated in Scrapy 2.19, a warning a request).
    """

    def open(self, spider: Any) -> None:
        super().open(spider)
        self.shared: SharedCrawl = spider.shared

    def enqueue_request(self, request: Any) -> bool:
        if not request.dont_filter and self.df.request_seen(request):
            self.df.log(request, self.spider)
            return False
        self.queue.push(request)
        self.stats.inc_value("scheduler/enqueued/redis")
        return True

    def next_request(self) -> Any:
        self.shared.beat()
        if not self.shared.busy:
            if not len(self.queue):
                return None
            self.shared.set_busy(True)
        if request := self.queue.pop():
            self.stats.inc_value("scheduler/dequeued/redis")
        return request


class SharedConcurrencyMiddleware:
    """At most `concurrency` requests in flight per host for the whole crawl, all processes together.

    Scrapy's CONCURRENT_REQUESTS_PER_DOMAIN caps one process only. This middleware sits after the
    HTTP cache (a cached page takes no slot) and waits, without blocking the process, for a lease
    on one of the host's slots in Redis; the response or the error gives it back.
    """

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.leases = itertools.count()
        self.timeout_s = crawler.settings.getfloat("DOWNLOAD_TIMEOUT") + 30
        self.script: Any = None

    @classmethod
    def from_crawler(cls, crawler: Any) -> SharedConcurrencyMiddleware:
        if not crawler.settings.get("TUNELINE_REDIS_NAMESPACE"):
            raise NotConfigured("a crawl on one machine: Scrapy's own per-domain cap holds")
        return cls(crawler)

    async def process_request(self, request: Any) -> None:
        shared: SharedCrawl = self.crawler.spider.shared
        if self.script is None:
            self.script = shared.server.register_script(LEASE)
        key = shared.key(f"active:{urlparse_cached(request).hostname}")
        lease = f"{shared.process_id}:{next(self.leases)}"
        limit = self.crawler.spider.args.concurrency
        while not self.script(keys=[key], args=[limit, lease, self.timeout_s]):
            await asyncio.sleep(LEASE_POLL_S)
        request.meta[LEASE_META] = (key, lease)

    def process_response(self, request: Any, response: Any) -> Any:
        self.give_back(request)
        return response

    def process_exception(self, request: Any, exception: Exception) -> None:
        self.give_back(request)

    def give_back(self, request: Any) -> None:
        if held := request.meta.pop(LEASE_META, None):
            self.crawler.spider.shared.server.zrem(*held)
