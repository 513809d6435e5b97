"""The guard every request passes, redirects included: allowed hosts only, no private addresses.

Scrapy re-schedules a redirect as a new request, so checking each request here also checks
where every redirect leads. Hosts are compared without the port (unlike LinkExtractor's
allow_domains), exactly, after normalising how they are spelt (an IP address in any of the forms
resolvers accept, 127.1 or 0x7f.0.0.1 or 2130706433, is compared in its canonical form); names
allow their subdomains only when the source sets `subdomains` (Scrapy's offsite filter always does,
by suffix: matched that way, a start URL on 127.1 let the crawl reach 127.0.127.1). A host that
resolves to a private, loopback, link-local or otherwise non-public address is refused unless the
source sets `allow_private`.

Also here: Scrapy's robots.txt middleware, fixed for requests that wait for robots.txt together.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware as ScrapyRobotsTxtMiddleware
from scrapy.exceptions import IgnoreRequest
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from tuneline.crawlers.args import canonical_host, ip_address_of
from twisted.internet.defer import Deferred


def host_allowed(host: str, domains: list[str], subdomains: bool = False) -> bool:
    """Whether a host is one of the allowed hosts (canonical, as `SiteArgs.domains()` gives them),
    compared exactly after normalising its spelling; with `subdomains`, a name also allows the names
    under it. An IP address only ever matches itself: 127.0.127.1 is no subdomain of 127.1."""
    host = canonical_host(host)
    if host in domains:
        return True
    if not subdomains or ip_address_of(host) is not None:
        return False
    return any(host.endswith("." + domain) for domain in domains if ip_address_of(domain) is None)


def offsite_detail(host: str, domains: list[str], subdomains: bool) -> str:
    """Why a host was refused, and what would allow it."""
    shown = ", ".join(domains[:5]) + (f" and {len(domains) - 5} more" if len(domains) > 5 else "")
    fix = "add it to allowed_domains" if subdomains else "add it to allowed_domains or set subdomains: true"
    return f"host {host} is not an allowed host ({shown}; subdomains: {str(subdomains).lower()}); {fix}"


def non_public_address(host: str) -> str | None:
    """The first address of the host that is not public, or None when all are public."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return None  # unresolvable: the download fails on its own, with the resolver's error
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            return str(address)
    return None


class AllowedHostsMiddleware:
    """Refuse a request to a host outside the crawl's domains or at a non-public address."""

    def __init__(self, crawler) -> None:  # noqa: ANN001 (Scrapy's crawler)
        self.crawler = crawler
        self.addresses: dict[str, str | None] = {}

    @classmethod
    def from_crawler(cls, crawler):  # noqa: ANN001, ANN206
        return cls(crawler)

    def process_request(self, request) -> None:  # noqa: ANN001
        spider = self.crawler.spider
        stats = self.crawler.stats
        parts = urlsplit(request.url)
        if parts.scheme not in ("http", "https"):
            return self.refuse(request, "scheme", f"{parts.scheme}: URLs are not crawled")
        host = parts.hostname or ""
        domains, subdomains = spider.domains, spider.args.subdomains
        if not host_allowed(host, domains, subdomains):
            return self.refuse(request, "offsite", offsite_detail(host, domains, subdomains))
        if not spider.args.allow_private:
            if host not in self.addresses:
                self.addresses[host] = non_public_address(host)
            if address := self.addresses[host]:
                return self.refuse(
                    request, "private_address",
                    f"host {host} resolves to the non-public address {address}; "
                    "set allow_private: true for a local site",
                )  # fmt: skip
        stats.inc_value("tuneline/allowed")
        return None

    def refuse(self, request, reason: str, detail: str) -> None:  # noqa: ANN001
        self.crawler.stats.inc_value(f"tuneline/refused/{reason}")
        self.crawler.stats.set_value("tuneline/last_error", f"{request.url}: refused: {detail}")
        raise IgnoreRequest(f"{reason}: {detail}")


class RobotsTxtMiddleware(ScrapyRobotsTxtMiddleware):
    """Scrapy's robots.txt middleware, with every request that waits for a host's robots.txt
    getting its rules.

    Scrapy 2.19 makes each waiting request await the one Deferred that the download fires with the
    parser; awaiting a Deferred consumes its result, so the first waiter got the rules and every
    later one got None, which lets the request through (several start URLs on one host, or links
    handed over by another crawl process, all wait at once). Here each waiter gets a Deferred of
    its own that relays the result and passes it on.
    """

    async def robot_parser(self, request):  # noqa: ANN001, ANN201 (Scrapy's signature)
        pending = self._parsers.get(urlparse_cached(request).netloc)
        if isinstance(pending, Deferred):
            mine: Deferred = Deferred()

            def relay(parser):  # noqa: ANN001, ANN202
                mine.callback(parser)
                return parser

            pending.addCallback(relay)
            return await maybe_deferred_to_future(mine)
        return await super().robot_parser(request)
