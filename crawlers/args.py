"""The spider's typed arguments, validated before a single request is made.

Like zyte-spider-templates, the spider takes one pydantic model instead of loose strings: the
crawl source of a recipe, minus its `kind` and `name`, arrives as `-a args=<json>`. Its fields
mirror `tuneline.recipe.CrawlSource` (a test keeps the two in step) so this package needs
nothing from Tuneline.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

# What a numeric IPv4 spelling can hold: decimal, octal (0177) and hex (0x7f) parts, 1 to 4 of them.
NUMERIC_HOST = re.compile(r"[0-9a-fx.]{1,64}")


def ip_address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host spells, whatever the spelling resolvers accept (127.1, 0x7f.0.0.1,
    0177.0.0.1, 2130706433, ::ffff:127.0.0.1 are all 127.0.0.1); None for a name."""
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]").split("%")[0])
    except ValueError:
        if not NUMERIC_HOST.fullmatch(host):
            return None
        try:  # the C library's inet_aton: the parser getaddrinfo uses for numeric hosts
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def canonical_host(host: str) -> str:
    """A host as the crawl compares hosts: an IP address in its one canonical form, a name
    lowercased, without its final dot, in IDNA ASCII form."""
    host = host.strip().lower().rstrip(".")
    if (address := ip_address_of(host)) is not None:
        return str(address)
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


class SiteArgs(BaseModel):
    """What to crawl, how far, and what to make of each page."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["documents", "pairs"] = "documents"
    start_urls: list[str] = Field(default_factory=list)
    sitemaps: list[str] = Field(default_factory=list)
    allowed_domains: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    max_depth: int = Field(3, ge=0)
    max_pages: int = Field(1000, ge=1)
    selectors: Literal["css", "xpath"] = "css"
    pair: str | None = None
    question: str | None = None
    answer: str | None = None
    concurrency: int = Field(4, ge=1, le=64)
    processes: int = Field(1, ge=1, le=16)
    allow_private: bool = False
    subdomains: bool = False
    # The spider reads the URL from its settings (REDIS_URL, from the environment), never from here:
    # the arguments are on the command line. Kept to mirror the recipe section.
    redis_url: str | None = None

    def domains(self) -> list[str]:
        """Allowed hosts in canonical form: the configured ones, or the hosts of the start URLs and
        sitemaps."""
        hosts = self.allowed_domains or [urlsplit(url).hostname for url in [*self.start_urls, *self.sitemaps]]
        return sorted({canonical_host(host) for host in hosts if host})
