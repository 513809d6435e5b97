"""What the spider yields: one document per page, or one question/answer pair per FAQ entry.

A page the spider could not make sense of still yields an item, with `error` set, so the
validation pipeline drops it with that reason instead of it vanishing.
"""

import scrapy


class DocumentItem(scrapy.Item):
    """A page: its main text and title, and the raw HTML so text can be re-extracted later."""

    url = scrapy.Field()
    fetched_at = scrapy.Field()
    depth = scrapy.Field()
    title = scrapy.Field()
    text = scrapy.Field()
    html = scrapy.Field()
    error = scrapy.Field()


class PairItem(scrapy.Item):
    """A question and its answer from an FAQ page."""

    url = scrapy.Field()
    fetched_at = scrapy.Field()
    depth = scrapy.Field()
    title = scrapy.Field()
    question = scrapy.Field()
    answer = scrapy.Field()
    error = scrapy.Field()
