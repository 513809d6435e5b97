"""Spiders of the Tuneline Scrapy project: one generic spider, `site`."""
