"""Item pipelines: validate what the spider yielded, and drop the rest with a reason.

The reason's first word (before the colon) is the key counted in the stage ledger.
"""

from scrapy.exceptions import DropItem

from crawlers.items import DocumentItem, PairItem

MIN_TEXT_CHARS = 20


class ValidatePipeline:
    """Keep documents with main text and pairs with both halves; drop anything else with why."""

    def process_item(self, item):
        if item.get("error"):
            raise DropItem(item["error"])
        if isinstance(item, DocumentItem):
            text = (item.get("text") or "").strip()
            if len(text) < MIN_TEXT_CHARS:
                raise DropItem(f"no_text: {len(text)} characters of main text (fewer than {MIN_TEXT_CHARS})")
        elif isinstance(item, PairItem):
            if not (item.get("question") or "").strip():
                raise DropItem("empty_question: the question selector matched no text")
            if not (item.get("answer") or "").strip():
                raise DropItem("empty_answer: the answer selector matched no text")
        return item
