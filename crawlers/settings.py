"""Scrapy settings for Tuneline crawls: polite and safe by default.

Robots.txt obeyed, AutoThrottle on, a user agent that names Tuneline, no telnet or remote
control listener, and an HTTP cache that never stores a failure (else a retry would replay it).
Per-crawl values (feed path, concurrency, depth, cache folder) come as `-s` options.
"""

import os

BOT_NAME = "tuneline"
SPIDER_MODULES = ["tuneline.crawlers.spiders"]
NEWSPIDER_MODULE = "tuneline.crawlers.spiders"

USER_AGENT = "Tuneline/0.1 (+https://github.com/tuneline/tuneline; dataset crawler)"
ROBOTSTXT_OBEY = True

CONCURRENT_REQUESTS = 32
# Items processed in parallel *per response*. Scrapy 2.13+ starts this many asyncio worker tasks
# for every callback's output; a page yields one document (or a few pairs) and some links, so
# the default 100 spent most of the crawl's CPU creating idle tasks (~100 per page).
CONCURRENT_ITEMS = 8
CONCURRENT_REQUESTS_PER_DOMAIN = 4
AUTOTHROTTLE_ENABLED = True
# Scrapy's 5 s start delay only slows the first pages; latency sets the pace within seconds.
AUTOTHROTTLE_START_DELAY = 0.5
AUTOTHROTTLE_MAX_DELAY = 30.0
AUTOTHROTTLE_TARGET_CONCURRENCY = 4.0

RETRY_ENABLED = True
RETRY_TIMES = 3
RETRY_HTTP_CODES = [500, 502, 503, 504, 522, 524, 408, 429]
DOWNLOAD_TIMEOUT = 30

TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False

HTTPCACHE_ENABLED = True
HTTPCACHE_POLICY = "scrapy.extensions.httpcache.DummyPolicy"
# One SQLite file per spider: the filesystem storage writes six files a page and the DBM one
# opens four (dbm.dumb, where Python lacks gdbm); either took a third or more of the crawl's CPU.
HTTPCACHE_STORAGE = "tuneline.crawlers.cache.SqliteCacheStorage"
# The cache serves a retried or re-configured crawl; after a day pages are fetched afresh.
HTTPCACHE_EXPIRATION_SECS = 24 * 3600
# The cache stores 5xx by default; a cached failure would be served to every retry.
HTTPCACHE_IGNORE_HTTP_CODES = [408, 429, *range(500, 600)]

DOWNLOADER_MIDDLEWARES = {
    # Before robots.txt (100) and redirects (600): every request and redirect passes the guard.
    "tuneline.crawlers.middlewares.AllowedHostsMiddleware": 50,
    # Scrapy's own lets through all but the first request waiting for a host's robots.txt.
    "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware": None,
    "tuneline.crawlers.middlewares.RobotsTxtMiddleware": 100,
    # A crawl shared through Redis only: after the HTTP cache (900), one lease per request in flight.
    "tuneline.crawlers.shared.SharedConcurrencyMiddleware": 950,
}
ITEM_PIPELINES = {
    "tuneline.crawlers.pipelines.ExtractTextPipeline": 100,
    "tuneline.crawlers.pipelines.ValidatePipeline": 200,
}
# Async pipelines (text extraction awaits worker processes) need the asyncio reactor.
TWISTED_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
EXTENSIONS = {
    "tuneline.crawlers.extensions.CrawlReport": 500,
}

FEED_EXPORT_ENCODING = "utf-8"
LOG_LEVEL = "INFO"

# A crawl shared through Redis (the source's redis_url): the URL comes through the environment,
# not as a `-s` option, so a password in it stays out of the process list. Read by scrapy-redis.
REDIS_URL = os.environ.get("TUNELINE_REDIS_URL")
# Its password, never in the URL (the recipe refuses one): REDISCLI_AUTH, as redis-cli reads it.
REDIS_PARAMS = {"password": os.environ.get("REDISCLI_AUTH")}
