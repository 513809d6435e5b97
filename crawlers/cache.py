"""HTTP cache storage in one SQLite file per spider.

Scrapy's filesystem storage writes six files a page, and its DBM storage falls back to the pure
Python `dbm.dumb` where the interpreter lacks gdbm (pyenv builds often do): four file opens a
page, a third of a fast crawl's CPU. SQLite is in every Python, stores a page with one insert,
and commits every COMMIT_EVERY pages (and at the end): a crash loses at most those cache entries,
which the next crawl simply fetches again.
"""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path
from time import time
from typing import Any

from scrapy.utils.project import data_path
from scrapy.utils.response import response_from_dict

COMMIT_EVERY = 100


class SqliteCacheStorage:
    """A Scrapy HTTPCACHE_STORAGE: responses by request fingerprint, with the time they were stored."""

    def __init__(self, settings: Any) -> None:
        self.cachedir = data_path(settings["HTTPCACHE_DIR"], createdir=True)
        self.expiration_secs = settings.getint("HTTPCACHE_EXPIRATION_SECS")
        self.db: sqlite3.Connection | None = None
        self.uncommitted = 0

    def open_spider(self, spider: Any) -> None:
        self.db = sqlite3.connect(Path(self.cachedir, f"{spider.name}.sqlite"))
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, stored REAL, data BLOB)")
        self.fingerprinter = spider.crawler.request_fingerprinter

    def close_spider(self, spider: Any) -> None:
        self.db.commit()
        self.db.close()

    def retrieve_response(self, spider: Any, request: Any) -> Any:
        key = self.fingerprinter.fingerprint(request).hex()
        row = self.db.execute("SELECT stored, data FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        stored, data = row
        if 0 < self.expiration_secs < time() - stored:
            return None
        request.meta["cache_timestamp"] = stored
        return response_from_dict(pickle.loads(data))  # noqa: S301 (written by this class only)

    def store_response(self, spider: Any, request: Any, response: Any) -> None:
        key = self.fingerprinter.fingerprint(request).hex()
        data = pickle.dumps(response.to_dict(), protocol=4)
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, time(), data))
        self.uncommitted += 1
        if self.uncommitted >= COMMIT_EVERY:
            self.db.commit()
            self.uncommitted = 0
