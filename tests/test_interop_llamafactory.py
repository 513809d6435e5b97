"""Interop: LLaMA-Factory's three demo sets through the default clean and gate, unharmed.

alpaca_en_demo, glaive_toolcall_en_demo and identity (read in the format dataset_info.json gives
them) must pass the default gate, and clean may change a kept record only by the repairs
docs/curate.md lists: whitespace normalization, and PII replaced by a documentation placeholder.
Markup that is content (HTML answers, `<stdio.h>`, `<analogy>` tokens) stays byte-identical; tool
calls keep their name, valid JSON arguments with the same keys and types, and the same tool schema.
Reads ../shared/data/llamafactory/ and skips with a message where it is absent.
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tuneline.curate.clean import Cleaner, repair_record
from tuneline.curate.gate import GateFailed, check_records
from tuneline.formats import read_records
from tuneline.recipe import CleanSpec, GateSpec

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMAFACTORY = SHARED / "data" / "llamafactory"
if not LLAMAFACTORY.is_dir():
    pytest.skip(f"{LLAMAFACTORY} not found: LLaMA-Factory's demo sets are absent", allow_module_level=True)

DEMO_SETS = ("alpaca_en_demo", "glaive_toolcall_en_demo", "identity")
# What docs/curate.md lists as the repairs the defaults make to these files, and the drops.
DOCUMENTED_REPAIRS = {"whitespace"}
EXPECTED_DROPS = {"duplicate", "near_duplicate"}
# Placeholders clean.pii writes (documentation values), and what each may stand for.
PLACEHOLDER = re.compile(
    r"user\d+@example\.com|555-01\d\d|192\.0\.2\.\d+|2001:db8::[0-9a-f]+|<CARD>|<SECRET>"
)
TAG = re.compile(r"<[^<>\n]{1,200}>")
OLD_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]{0,20}\b[^<>]{0,500}>")  # what html: strip took


@pytest.fixture(scope="module", params=DEMO_SETS)
def demo(request):
    """(name, records as read, [(record, drop reason)] from the default clean, clean's stats)."""
    name = request.param
    info = json.loads((LLAMAFACTORY / "dataset_info.json").read_text(encoding="utf-8"))[name]
    records = read_records(LLAMAFACTORY / info["file_name"], info.get("formatting", "alpaca")).records
    cleaner = Cleaner(CleanSpec())
    return name, records, cleaner.clean_batch(records), cleaner.stats()


def same_but_placeholders(original: str, cleaned: str) -> bool:
    """`cleaned` is `original` with some PII-shaped spans replaced by documentation placeholders."""
    pieces = PLACEHOLDER.split(cleaned)
    placeholders = PLACEHOLDER.findall(cleaned)
    pattern = "(.+?)".join(map(re.escape, pieces))
    match = re.fullmatch(pattern, original, re.DOTALL)
    if match is None:
        return False
    replaced = [(p, v) for p, v in zip(placeholders, match.groups(), strict=True) if p != v]
    # An address or number was replaced (a card or secret tag may stand for any token).
    return all(p.startswith("<") or re.search(r"[@\d]", v) for p, v in replaced)


def users(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")


def test_the_demo_sets_pass_the_default_gate(demo):
    name, _, cleaned, _ = demo
    kept = [record for record, reason in cleaned if reason is None]
    try:
        check_records(lambda: kept, GateSpec(), None)
    except GateFailed as failed:
        pytest.fail(f"{name}: {failed}")


def test_clean_changes_no_record_beyond_the_documented_repairs(demo):
    name, records, cleaned, stats = demo
    assert set(stats["repaired"]) <= DOCUMENTED_REPAIRS, stats
    drops = Counter(reason for _, reason in cleaned if reason)
    assert set(drops) <= EXPECTED_DROPS, drops
    for original, (record, reason) in zip(records, cleaned, strict=True):
        if reason:
            continue
        assert record["tools"] == original["tools"] and record["meta"] == original["meta"]
        repaired = repair_record(original, CleanSpec(), Counter())["messages"]
        for before, fixed, after in zip(original["messages"], repaired, record["messages"], strict=True):
            where = f"{name} line {original['meta']['line']}"
            assert same_but_placeholders(fixed["content"], after["content"]), (
                f"{where}: {after['content']!r:.200}"
            )
            assert Counter(TAG.findall(after["content"])) == Counter(TAG.findall(before["content"])), where


def test_the_eleven_records_holding_markup_stay_byte_identical():
    """The records the old default (`html: strip`) rewrote: HTML answers, `<stdio.h>`, `<analogy>`."""
    records = read_records(LLAMAFACTORY / "alpaca_en_demo.json", "alpaca").records
    tagged = [r for r in records if any(OLD_HTML_TAG.search(m["content"]) for m in r["messages"])]
    assert len(tagged) == 11
    cleaner = Cleaner(CleanSpec(near_dedup=False, dedup=False))
    assert [record for record, _ in cleaner.clean_batch(tagged)] == tagged
    assert cleaner.stats()["repaired"] == {}


def test_tool_calls_stay_valid_with_the_same_schema(demo):
    name, records, cleaned, _ = demo
    calls = 0
    for original, (record, reason) in zip(records, cleaned, strict=True):
        if reason:
            continue
        for before, after in zip(original["messages"], record["messages"], strict=True):
            for old, new in zip(before.get("tool_calls") or [], after.get("tool_calls") or [], strict=True):
                calls += 1
                old_args, new_args = json.loads(old["arguments"]), json.loads(new["arguments"])
                assert new["name"] == old["name"] and isinstance(new_args, dict)
                assert {k: type(v) for k, v in new_args.items()} == {k: type(v) for k, v in old_args.items()}
                for key, value in new_args.items():
                    if isinstance(value, str) and value != old_args[key]:
                        assert same_but_placeholders(old_args[key], value), (name, key, value)
                        # The call still copies what the user said: the placeholder is in the user's turn.
                        assert (value in users(record)) == (old_args[key] in users(original)), (name, value)
    assert calls > 100 if name.startswith("glaive") else calls == 0
