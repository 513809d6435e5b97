"""A loopback fixture website for crawl tests: 30 article pages and the traps a crawl must handle.

`/robots.txt` disallows `/private/`; `/flaky` answers 500 twice before 200; `/later` answers 503
to a whole crawl; `/redirect-out` redirects to `localhost` (a host outside the allowed domains);
the index links to a private address (10.255.255.1) and to pages that cannot be parsed;
`/faq/1` and `/faq/2` hold question/answer blocks for pairs mode; `/sitemap.xml` lists four
pages, `/sitemap-index.xml` that sitemap and another of ten; `/hosts` links to the site under other
spellings of its address and to other loopback hosts. The server records every path requested.
"""

from __future__ import annotations

import http.server
import threading
from collections import Counter

ARTICLES = 30
WORDS = (
    "The pipeline keeps every record it receives and writes the reason for each one it drops. "
    "Stages are cached by content, so a second run only repeats what changed since the last one. "
)


def page(title: str, body: str) -> bytes:
    return (
        f"<html><head><title>{title}</title></head><body>"
        f"<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
        f"<article><h1>{title}</h1>{body}</article>"
        f"<footer>Copyright Example Corp</footer></body></html>"
    ).encode()


def article(n: int) -> bytes:
    nxt = f"<a href='/page/{n + 1}'>next</a>" if n + 1 < ARTICLES else ""
    return page(f"Article {n}", f"<p>Article number {n}. {WORDS * 3}</p>{nxt}")


FAQ = {
    "/faq/1": [("How do I reset my password?", "Open settings and choose Reset password."),
               ("Can I export my data?", "Yes, use Export in the account menu.")],
    "/faq/2": [("Where is my invoice?", "Invoices are under Billing, one per month.")],
}  # fmt: skip


# Linked from /hosts, page n from host n: 127.0.0.1 spelt three ways, then three other hosts.
HOSTS = ["0x7f.0.0.1", "2130706433", "0177.0.0.1", "127.0.127.1", "127.0.0.2", "localhost"]
SITEMAP = ["/page/0", "/page/1", "/page/2", "/faq/1"]
SITEMAP_MORE = [f"/page/{n}" for n in range(10, 20)]
SITEMAP_INDEX = ["/sitemap.xml", "/sitemap-more.xml"]


class SiteHandler(http.server.BaseHTTPRequestHandler):
    """Serves the fixture site; `hits` counts requests per path across the server's life."""

    hits: Counter
    flaky_failures: int = 2

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits[self.path] += 1
        path = self.path
        port = self.server.server_port
        if path == "/robots.txt":
            return self.send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
        if path == "/":
            links = "".join(f"<li><a href='/page/{n}'>Article {n}</a></li>" for n in range(ARTICLES))
            links += (
                "<li><a href='/private/secret'>secret</a></li><li><a href='/flaky'>flaky</a></li>"
                "<li><a href='/redirect-out'>elsewhere</a></li>"
                "<li><a href='http://10.255.255.1/admin'>router</a></li>"
                "<li><a href='/empty'>empty</a></li><li><a href='/download'>download</a></li>"
                "<li><a href='/faq/1'>FAQ 1</a></li><li><a href='/faq/2'>FAQ 2</a></li>"
                "<li><a href='/later'>later</a></li>"
            )
            return self.send(200, page("Index", f"<p>{WORDS}</p><ul>{links}</ul>"))
        if path.startswith("/page/") and path[6:].isdigit() and int(path[6:]) < ARTICLES:
            return self.send(200, article(int(path[6:])))
        if path in ("/sitemap.xml", "/sitemap-more.xml"):
            pages = SITEMAP if path == "/sitemap.xml" else SITEMAP_MORE
            locs = "".join(f"<url><loc>http://127.0.0.1:{port}{page}</loc></url>" for page in pages)
            xml = f'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{locs}</urlset>'
            return self.send(200, xml.encode(), "application/xml")
        if path == "/sitemap-index.xml":
            maps = "".join(f"<sitemap><loc>http://127.0.0.1:{port}{m}</loc></sitemap>" for m in SITEMAP_INDEX)
            xml = f'<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{maps}</sitemapindex>'
            return self.send(200, xml.encode(), "application/xml")
        if path == "/hosts":  # the same server under other spellings of its address, and other hosts
            links = "".join(
                f"<a href='http://{host}:{port}/page/{n}'>{host}</a>" for n, host in enumerate(HOSTS)
            )
            return self.send(200, page("Hosts", f"<p>{WORDS}</p>{links}"))
        if path == "/about":
            return self.send(200, page("About", f"<p>About us. {WORDS}</p>"))
        if path == "/private/secret":
            return self.send(200, page("Secret", f"<p>Nobody should crawl this. {WORDS}</p>"))
        if path == "/flaky":
            if self.hits[path] <= self.flaky_failures:
                return self.send(500, b"try again", "text/plain")
            return self.send(200, page("Flaky", f"<p>Answered on the third try. {WORDS}</p>"))
        if path == "/later":  # down for a whole crawl (first try and 3 retries), then up
            if self.hits[path] <= 4:
                return self.send(503, b"down for maintenance", "text/plain")
            return self.send(200, page("Later", f"<p>Back after maintenance. {WORDS}</p>"))
        if path == "/redirect-out":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/elsewhere":
            return self.send(200, page("Elsewhere", f"<p>Outside the allowed domains. {WORDS}</p>"))
        if path == "/empty":
            return self.send(200, b"<html><body></body></html>")
        if path == "/download":
            return self.send(200, b"\x89PNG\r\n\x1a\n" + bytes(64), "application/octet-stream")
        if path in FAQ:
            blocks = "".join(f"<div class='faq'><h3>{q}</h3><p>{a}</p></div>" for q, a in FAQ[path])
            return self.send(200, page(f"FAQ {path[-1]}", blocks))
        return self.send(404, b"not found", "text/plain")

    def send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class FixtureSite:
    """The site on 127.0.0.1 (or another loopback address) at an OS-chosen port, in a background thread."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        handler = type("Handler", (SiteHandler,), {"hits": Counter()})
        self.handler = handler
        self.server = http.server.ThreadingHTTPServer((address, port), handler)
        self.port = self.server.server_port
        self.url = f"http://{address}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def hits(self) -> Counter:
        return self.handler.hits

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
