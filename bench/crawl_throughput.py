"""Benchmark: the Tuneline crawl (spider, guard, pipelines, text extraction, HTTP cache) against a
minimal plain `scrapy runspider` spider, on the same loopback site of a few thousand pages.

The site is served by nginx from files written here when nginx is installed (`apt-get install
nginx-light`; it takes little CPU, so the crawlers get the machine), else from memory by an aiohttp
server in a process of its own (`--server aiohttp`; it competes with the crawl for the 2 cores). The
crawls run in subprocesses with the same per-domain concurrency (all processes together): plain
Scrapy, Tuneline in one process, and Tuneline with `processes: N` (one per core by default);
pages/s counts pages over the crawl's own elapsed time (Scrapy's `start_time` to the spider
closing, the longest of a shared crawl's processes); process start-up is shown apart as the wall
time. Goals on 2 cores: >= 200 pages/s for Tuneline, and Tuneline / plain >= 0.8.

`--corpus python-docs` crawls real documentation instead: Debian's python3-doc HTML (530 pages of
~75 KB, `apt-get install python3-doc nginx-light`) served by nginx, and the plain spider extracts
each page's text with trafilatura as Tuneline does, so the ratio compares like with like. There the
text extraction (trafilatura, ~15-20 pages/s on one core for these pages) sets the pace.

    python bench/crawl_throughput.py [--pages 3000] [--concurrency 32] [--processes 2]
                                     [--server nginx|aiohttp] [--corpus synthetic|python-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from aiohttp import web

from tuneline.recipe import CrawlSource
from tuneline.sources.crawl import run_crawl

SECTIONS = 30
PYTHON_DOCS = Path("/usr/share/doc/python3/html").resolve()  # Debian's python3-doc
PARAGRAPH = (
    "Fine-tuning data is only as good as the pages it came from, so the crawler keeps the raw HTML "
    "beside the extracted text and records why every page it dropped was dropped. "
)

PLAIN_SPIDER = textwrap.dedent("""
    import json
    from datetime import datetime, timezone
    from urllib.parse import urlsplit

    import scrapy

    class PlainSpider(scrapy.Spider):
        name = "plain"

        def __init__(self, start="", stats_path="", extract="", **kwargs):
            super().__init__(**kwargs)
            self.start_urls = [start]
            self.allowed_domains = [urlsplit(start).hostname]  # as Tuneline's guard: this site only
            self.stats_path = stats_path
            self.extract = bool(extract)

        def parse(self, response):
            if not isinstance(response, scrapy.http.TextResponse):
                return
            item = {"url": response.url, "title": response.css("title::text").get()}
            if self.extract:  # what Tuneline does with every page: its main text
                import trafilatura

                doc = trafilatura.bare_extraction(response.text, url=response.url, fast=True)
                item["text"] = doc.text if doc else ""
            yield item
            # Relative and http(s) links only: a mailto: link would end the generator with an error.
            links = "//a[not(contains(@href, ':')) or starts-with(@href, 'http')]"
            yield from response.follow_all(xpath=links)

        def closed(self, reason):
            stats = self.crawler.stats.get_stats()
            elapsed = datetime.now(timezone.utc) - stats["start_time"]
            with open(self.stats_path, "w") as handle:
                json.dump({**stats, "elapsed_s": elapsed.total_seconds()}, handle, default=str)
""")


def build_site(pages: int) -> dict[str, bytes]:
    """Home -> sections -> articles; each article links to a few others, a nav and a footer."""
    per_section = -(-pages // SECTIONS)
    site: dict[str, bytes] = {}

    def html(title: str, body: str) -> bytes:
        return (
            f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> "
            f"<a href='/s/0'>Docs</a></nav><main><article><h1>{title}</h1>{body}</article></main>"
            f"<footer>Copyright Example Corp. All rights reserved.</footer></body></html>"
        ).encode()

    sections = "".join(f"<li><a href='/s/{s}'>Section {s}</a></li>" for s in range(SECTIONS))
    site["/"] = html("Home", f"<p>{PARAGRAPH}</p><ul>{sections}</ul>")
    for s in range(SECTIONS):
        articles = range(s * per_section, min(pages, (s + 1) * per_section))
        links = "".join(f"<li><a href='/a/{a}'>Article {a}</a></li>" for a in articles)
        site[f"/s/{s}"] = html(f"Section {s}", f"<p>{PARAGRAPH}</p><ul>{links}</ul>")
    for a in range(pages):
        related = "".join(f"<a href='/a/{(a * 7 + k) % pages}'>related {k}</a> " for k in range(1, 4))
        body = "".join(f"<p>Article {a}, paragraph {p}. {PARAGRAPH * 3}</p>" for p in range(6))
        site[f"/a/{a}"] = html(f"Article {a}", body + f"<p>{related}</p>")
    site["/robots.txt"] = b"User-agent: *\nAllow: /\n"
    return site


def serve_forever(pages: int, ports: multiprocessing.Queue) -> None:
    """The site from memory through aiohttp, in a process of its own so it never competes with
    the crawl for the GIL; puts its OS-chosen port on the queue."""
    site = build_site(pages)

    async def handle(request: web.Request) -> web.Response:
        body = site.get(request.path)
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        ports.put(tcp._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(run())


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type text/html;
    charset utf-8;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {site};
        location = / {{ try_files /index.html =404; }}
    }}
}}
"""


def free_port() -> int:
    """A port the OS says is free now (nginx needs a number in its config)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_nginx(pages: int, root: Path, docs: Path | None = None) -> tuple[subprocess.Popen, str]:
    """The synthetic site as static files under root (or the folder `docs` as it is), served by
    nginx with one worker; returns it and its URL."""
    # nginx's worker runs as an unprivileged user when started as root: it must be able to read.
    root.parent.chmod(0o755)
    if docs is None:
        for path, body in build_site(pages).items():
            target = root / "site" / (path.lstrip("/") or "index.html")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
    (root / "tmp").mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, site=docs or root / "site"))
    server = subprocess.Popen(
        [shutil.which("nginx") or "nginx", "-c", str(conf), "-e", str(root / "error.log")]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"nginx did not listen on port {port}: {(root / 'error.log').read_text()}")


def crawl_tuneline(
    url: str, pages: int, concurrency: int, processes: int, work: Path, max_depth: int = 3
) -> tuple[dict, float]:
    source = CrawlSource(
        name="bench", start_urls=[url + "/"], allow_private=True, max_depth=max_depth,
        max_pages=pages + SECTIONS + 1, concurrency=concurrency, processes=processes,
    )  # fmt: skip
    start = time.perf_counter()
    result = run_crawl(source, work / f"tuneline-{processes}", work / f"cache-{processes}")
    return result.stats, time.perf_counter() - start


def crawl_plain(url: str, concurrency: int, work: Path, extract: bool = False) -> tuple[dict, float]:
    spider = work / "plain_spider.py"
    spider.write_text(PLAIN_SPIDER)
    stats_path = work / "plain_stats.json"
    command = [
        sys.executable, "-m", "scrapy", "runspider", str(spider), "-a", f"start={url}/",
        "-a", f"stats_path={stats_path}", "-o", str(work / "plain.jsonl"),
        "-s", f"CONCURRENT_REQUESTS_PER_DOMAIN={concurrency}", "-s", f"CONCURRENT_REQUESTS={concurrency}",
        "-s", "LOG_LEVEL=WARNING", "-s", "TELNETCONSOLE_ENABLED=False",
        "-a", f"extract={'1' if extract else ''}",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "SCRAPY_SETTINGS_MODULE"}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env=env)
    return json.loads(stats_path.read_text()), time.perf_counter() - start


def rate(stats: dict) -> tuple[int, float, float]:
    pages = int(stats["response_received_count"])
    elapsed = float(stats["elapsed_s"])
    return pages, elapsed, pages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument(
        "--server", choices=["nginx", "aiohttp"], default="nginx" if shutil.which("nginx") else "aiohttp"
    )
    parser.add_argument("--corpus", choices=["synthetic", "python-docs"], default="synthetic")
    options = parser.parse_args()
    real = options.corpus == "python-docs"
    if real and not (PYTHON_DOCS.is_dir() and shutil.which("nginx")):
        sys.exit(
            f"--corpus python-docs needs {PYTHON_DOCS} and nginx: apt-get install python3-doc nginx-light"
        )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if real:
            (work / "nginx").mkdir()
            server, url = serve_nginx(0, work / "nginx", docs=PYTHON_DOCS)
            options.pages = 100_000  # the whole site: its own size bounds the crawl
        elif options.server == "nginx":
            (work / "nginx").mkdir()
            server, url = serve_nginx(options.pages, work / "nginx")
        else:
            ports: multiprocessing.Queue = multiprocessing.Queue()
            server = multiprocessing.Process(target=serve_forever, args=(options.pages, ports), daemon=True)
            server.start()
            url = f"http://127.0.0.1:{ports.get(timeout=30)}"
        try:
            plain_stats, plain_wall = crawl_plain(url, options.concurrency, work, extract=real)
            depth = 20 if real else 3
            runs = {
                processes: crawl_tuneline(url, options.pages, options.concurrency, processes, work, depth)
                for processes in sorted({1, options.processes})
            }
        finally:
            server.terminate()
    plain_pages, plain_s, plain_rate = rate(plain_stats)
    site = f"{PYTHON_DOCS} (real pages)" if real else f"{options.pages} articles + {SECTIONS} sections + home"
    print(f"site: {site}, concurrency {options.concurrency}, served by {'nginx' if real else options.server}")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average after the crawls {load} (other work skews pages/s)")
    print(f"{'plain runspider:':22s}{plain_pages:5d} pages in {plain_s:6.2f} s = {plain_rate:6.1f} pages/s "
          f"(wall {plain_wall:.1f} s)")  # fmt: skip
    for processes, (stats, wall) in runs.items():
        pages, seconds, pages_per_s = rate(stats)
        kept = stats.get("item_scraped_count", 0)
        label = f"tuneline, {processes} process{'es' if processes > 1 else ''}:"
        print(f"{label:22s}{pages:5d} pages in {seconds:6.2f} s = {pages_per_s:6.1f} pages/s "
              f"(wall {wall:.1f} s; {kept} documents: text, raw HTML, HTTP cache)")  # fmt: skip
    ratios = ", ".join(
        f"{processes} process{'es' if processes > 1 else ''} {rate(stats)[2] / plain_rate:.2f}"
        for processes, (stats, _) in runs.items()
    )
    print(f"ratio tuneline / plain: {ratios}   (goals: >= 200 pages/s, ratio >= 0.8)")


if __name__ == "__main__":
    main()
