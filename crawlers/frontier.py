"""One site's crawl shared by several Scrapy processes: a frontier in files, one owner per URL.

One Scrapy process spends a whole core on a fast site; `processes: N` runs N of them, each
owning the pages whose URL hashes to its index. A process follows links it owns and hands the
others to their owner through a file per (sender, receiver) pair, one JSON line per URL, which
the owner reads as it grows. Every page is fetched once, by its owner, who also keeps the
page budget through a counter all processes share under a file lock.

The crawl is over when every process is idle and every line sent has been read: each process
writes its state (idle or not, lines sent to each peer, lines read) to a file of its own, and
closes when the states of all processes, read twice in a row, say so and have not changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from pathlib import Path
from typing import Any, TextIO

BUDGET = "budget"


def owner_of(url: str, processes: int) -> int:
    """The index of the process that crawls a URL."""
    return zlib.crc32(url.encode()) % processes


class PageBudget:
    """Pages this crawl may still request: a counter in one process, a locked file across several."""

    def __init__(self, max_pages: int, path: Path | None = None) -> None:
        self.max_pages = max_pages
        self.used = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path else None

    def claim(self) -> bool:
        """Take one page from the budget; False once it is spent."""
        return self._add(1)

    def release(self) -> None:
        """Give back a page that was never fetched (robots.txt or the guard refused it)."""
        self._add(-1)

    def _add(self, step: int) -> bool:
        if self.fd is None:
            if step > 0 and self.used >= self.max_pages:
                return False
            self.used = max(self.used + step, 0)
            return True
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, 8, 0)
            used = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            if step > 0 and used >= self.max_pages:
                return False
            os.pwrite(self.fd, max(used + step, 0).to_bytes(8, "little"), 0)
            return True
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class Frontier:
    """This process's side of a shared crawl: which URLs are its own, and the mail to and from peers."""

    def __init__(self, folder: Path, index: int, processes: int) -> None:
        self.folder = folder
        self.index = index
        self.processes = processes
        self.handed: set[str] = set()
        self.sent = [0] * processes
        self.received = 0
        self.idle = False  # set by the spider: nothing to crawl and nothing unread
        self._outboxes: dict[int, TextIO] = {}
        self._inboxes: dict[int, tuple[Any, bytes]] = {}
        self._last_states: list[dict[str, Any]] | None = None
        self._written: dict[str, Any] | None = None

    def owns(self, url: str) -> bool:
        return owner_of(url, self.processes) == self.index

    def hand_over(self, url: str, depth: int) -> None:
        """Send a URL to the process that owns it, once."""
        if url in self.handed:
            return
        self.handed.add(url)
        peer = owner_of(url, self.processes)
        if peer not in self._outboxes:
            path = self.folder / f"{self.index}-to-{peer}.jsonl"
            self._outboxes[peer] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._outboxes[peer].write(json.dumps([url, depth]) + "\n")
        self.sent[peer] += 1

    def flush(self) -> None:
        for outbox in self._outboxes.values():
            outbox.flush()

    def receive(self) -> list[tuple[str, int]]:
        """URLs peers sent since the last call, as (url, depth); only whole lines are read."""
        found: list[tuple[str, int]] = []
        for peer in range(self.processes):
            if peer == self.index:
                continue
            if peer not in self._inboxes:
                path = self.folder / f"{peer}-to-{self.index}.jsonl"
                if not path.exists():
                    continue
                self._inboxes[peer] = (open(path, "rb"), b"")  # noqa: SIM115 (closed in close())
            inbox, partial = self._inboxes[peer]
            data = partial + inbox.read()
            *lines, rest = data.split(b"\n")
            self._inboxes[peer] = (inbox, rest)
            for line in lines:
                url, depth = json.loads(line)
                found.append((url, depth))
        self.received += len(found)
        return found

    def report(self) -> None:
        """Write this process's state for its peers (only when it changed), after flushing what it sent."""
        state = {"idle": self.idle, "sent": self.sent, "received": self.received}
        if state == self._written:
            return
        self.flush()
        path = self.folder / f"state-{self.index}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, path)
        self._written = json.loads(json.dumps(state))

    def finished(self) -> bool:
        """Whether every process is idle with all mail read, in two reads in a row."""
        states = []
        for peer in range(self.processes):
            try:
                states.append(json.loads((self.folder / f"state-{peer}.json").read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                self._last_states = None
                return False
        quiet = all(state["idle"] for state in states) and all(
            sum(state["sent"][peer] for state in states) == states[peer]["received"]
            for peer in range(self.processes)
        )
        stable = quiet and states == self._last_states
        self._last_states = states if quiet else None
        return stable

    def close(self) -> None:
        for outbox in self._outboxes.values():
            outbox.close()
        for inbox, _ in self._inboxes.values():
            inbox.close()
