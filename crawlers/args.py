"""The spider's typed arguments, validated before a single request is made.

Like zyte-spider-templates, the spider takes one pydantic model instead of loose strings: the
crawl source of a recipe, minus its `kind` and `name`, arrives as `-a args=<json>`. Its fields
mirror `tuneline.recipe.CrawlSource` (a test keeps the two in step) so this package needs
nothing from Tuneline.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field


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

    def domains(self) -> list[str]:
        """Allowed hosts: the configured ones, or the hosts of the start URLs and sitemaps."""
        if self.allowed_domains:
            return [domain.lower() for domain in self.allowed_domains]
        hosts = {urlsplit(url).hostname for url in [*self.start_urls, *self.sitemaps]}
        return sorted(host.lower() for host in hosts if host)
