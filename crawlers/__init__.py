"""The Scrapy project for crawl sources: spiders, items, pipelines, settings.

Each crawl runs in its own subprocess (Scrapy's reactor cannot restart in one process).
"""
