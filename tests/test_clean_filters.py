"""Clean filters, repairs, PII redaction and near-dedup: each drop asserts its reason."""

import json
from collections import Counter

import pytest

from tuneline.curate.clean import Cleaner, repair_text, run_clean
from tuneline.curate.dedup import NearDedup, choose_bands, near_duplicate_pairs
from tuneline.curate.pii import redact_text
from tuneline.recipe import CleanSpec
from tuneline.records import make_record
from tuneline.store import find_stage, iter_records, read_manifest, read_stats, write_stage


def conv(*turns):
    roles = ["user", "assistant"]
    return make_record([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)])


def msgs(*pairs):
    return {"id": "x", "messages": [{"role": r, "content": c} for r, c in pairs], "tools": None, "meta": {}}


def reasons(records, **spec):
    return [reason for _, reason in Cleaner(CleanSpec(**spec)).clean_batch(records)]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (msgs(("user", "a question"), ("user", "again"), ("assistant", "answer")), "roles_out_of_order"),
        (msgs(("user", "a question"), ("assistant", "answer"), ("user", "more?")), "last_turn_not_assistant"),
        (msgs(("assistant", "hello"), ("user", "q"), ("assistant", "a")), "roles_out_of_order"),
        (msgs(("user", "q"), ("system", "be nice"), ("assistant", "a")), "system_not_first"),
        (
            msgs(("user", "q"), ("assistant", "calling"), ("tool", "42"), ("assistant", "a")),
            "tool_turn_malformed",
        ),
        (msgs(("user", "question"), ("assistant", "  ")), "empty_turn"),
        (conv("q", "a"), "too_short"),
    ],
)
def test_structure_and_length_filters_name_their_reason(record, reason):
    assert reasons([record], min_chars=5) == [reason]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (".", "punctuation_answer"),
        (" ? ", "punctuation_answer"),
        ("…", "punctuation_answer"),
        ("", "empty_turn"),
        ("A", None),  # a multiple-choice letter
        ("3", None),  # a classification label (alpaca_en_demo: 1 true, 2 false, 3 uncertain)
        ("好", None),
        ("+", None),  # a symbol can answer: "which operator adds?"
        ("...", None),  # longer punctuation may be code or an ellipsis asked for
    ],
)
def test_one_character_answers_are_kept_unless_punctuation(answer, reason):
    assert reasons([conv("Which option is right?", answer)]) == [reason]


def test_tool_call_with_bad_arguments_is_malformed():
    record = msgs(("user", "weather?"), ("assistant", ""), ("tool", "sunny"), ("assistant", "It is sunny."))
    record["messages"][1]["tool_calls"] = [{"name": "weather", "arguments": "{not json"}]
    assert reasons([record]) == ["tool_turn_malformed"]
    record["messages"][1]["tool_calls"] = [{"name": "weather", "arguments": '{"city": "Oslo"}'}]
    assert reasons([record]) == [None]


def test_repairs_mojibake_control_chars_and_html():
    repairs = Counter()
    text = repair_text(
        "Caf\u00c3\u00a9 <b>open</b> &amp; ready\u200b\x07  \n\n\n\nnext", CleanSpec(), repairs, True
    )
    assert text == "Café open & ready\n\nnext"
    assert repairs == Counter({"mojibake": 1, "control_chars": 1, "html": 1, "whitespace": 1})


def test_whitespace_inside_code_blocks_is_kept():
    code = "```python\ndef a():  \n    pass\n\n\n\ndef b():\n    pass\n```"
    repairs = Counter()
    assert repair_text(f"Here:  \n\n\n\n{code}", CleanSpec(), repairs) == f"Here:\n\n{code}"
    assert repairs == Counter(whitespace=1)


# Answers that ARE markup (as in LLaMA-Factory's alpaca_en_demo), and text that only looks like tags.
MARKUP_IS_CONTENT = [
    ("Parse this JSON into an HTML table.", "<table>\n  <tr><th>Name</th></tr>\n</table>"),
    ("Create a web page for a bakery.", "<!DOCTYPE html>\n<html><body><h1>Bread</h1></body></html>"),
    ("Create a divider line using CSS.", 'Use the `<hr>` element:\n\n```html\n<hr class="x">\n```'),
    ("Write a C program summing an array.", "```\n#include <stdio.h>\nint main() { return 0; }\n```"),
    ("Replace the <analogy> token: sea is to fish as sky is to <analogy>", "bird"),
    ("Select the chorus of the following song.\n\n<Song>", "The chorus is the repeated part."),
    ("What does this snippet print?", "It prints `<b>bold</b> &amp;` as it stands."),
]


def test_html_default_leaves_markup_in_conversation_records_byte_identical():
    records = [conv(q, a) for q, a in MARKUP_IS_CONTENT]
    cleaner = Cleaner(CleanSpec(near_dedup=False))
    cleaned = cleaner.clean_batch(records)
    assert [reason for _, reason in cleaned] == [None] * len(records)
    assert [record for record, _ in cleaned] == records
    assert "html" not in cleaner.stats()["repaired"]


def web(question, answer):
    record = conv(question, answer)
    record["meta"] = {"source": "site", "source_kind": "crawl", "url": "http://127.0.0.1/faq"}
    return record


def test_html_auto_strips_web_page_text_but_never_code_or_asked_for_markup():
    remnant = web("<p>Opening&nbsp;hours?</p>", "<b>From nine</b> to five.<br>")
    code = web(
        "How do I print a bold word?", "<div>Print:</div>\n```\nprint('<b>x</b>')\n```\nor `<b>x</b>`."
    )
    asked = web("How do I make a table in HTML?", "Use <table> with <tr> rows.")
    cleaner = Cleaner(CleanSpec(near_dedup=False))
    (stripped, _), (kept_code, _), (kept_asked, _) = cleaner.clean_batch([remnant, code, asked])
    assert [m["content"] for m in stripped["messages"]] == ["Opening\u00a0hours?", "From nine to five."]
    assert kept_code["messages"][1]["content"] == "Print:\n```\nprint('<b>x</b>')\n```\nor `<b>x</b>`."
    assert kept_asked == asked
    assert cleaner.stats()["repaired"]["html"] == 3


def test_html_strip_and_drop_modes_spare_markup_that_is_content():
    leftover = conv("Opening hours?", "<span>From nine.</span>")
    content = [conv(q, a) for q, a in MARKUP_IS_CONTENT]
    cleaner = Cleaner(CleanSpec(html="strip", near_dedup=False))
    [(stripped, _), *kept] = cleaner.clean_batch([leftover, *content])
    assert stripped["messages"][1]["content"] == "From nine."
    assert [record for record, _ in kept] == content
    dropped = reasons([leftover, *content], html="drop", near_dedup=False)
    assert dropped == ["html_remnants"] + [None] * len(content)
    assert reasons([web("Opening hours?", "<i>Nine</i>")], html="keep") == [None]


def test_html_drop_mode_and_over_length_truncation():
    assert reasons([conv("question <div>x</div>", "answer")], html="drop") == ["html_remnants"]
    [(record, reason)] = Cleaner(CleanSpec(max_chars=30, over_length="truncate")).clean_batch(
        [conv("short question", "a" * 100)]
    )
    assert reason is None and len(record["messages"][1]["content"]) == 30 - len("short question\n")
    assert reasons([conv("q" * 50, "a")], max_chars=30, over_length="truncate") == ["too_long"]


def test_pii_is_redacted_with_documentation_values_and_counts_by_kind():
    counts = Counter()
    text = redact_text(
        "mail bob@mailhost.io, call +1 415-867-5309, host 81.2.69.160, card 4111 1111 1111 1111, "
        "order 1234567890123, key sk-proj-abcdefghijklmnopqrstuvwxyz123456, again bob@mailhost.io",
        ["email", "phone", "ip", "card", "secret"],
        counts,
    )
    assert text == (
        "mail user1@example.com, call 555-0100, host 192.0.2.1, card <CARD>, order 1234567890123, "
        "key <SECRET>, again user1@example.com"
    )
    assert counts == Counter(email=2, phone=1, ip=1, card=1, secret=1)


@pytest.mark.parametrize(
    "text",
    [
        "write to bob@example.com, ann@example.org, ops@mail.example.net",
        "or to a@host.example, b@ci.test, c@nowhere.invalid",
        "servers 192.0.2.7, 198.51.100.23, 203.0.113.250 and 2001:db8:0:0:0:0:0:1",
        "private 10.0.0.12, loopback 127.0.0.1, mask 255.255.255.0",
        "call (555) 555-0123 or +1 202-555-0175",
        "again user1@example.com, 555-0100, 192.0.2.1",  # what redaction writes is not redacted again
    ],
)
def test_documentation_values_are_not_pii(text):
    counts = Counter()
    assert redact_text(text, ["email", "phone", "ip", "card", "secret"], counts) == text
    assert counts == Counter()


def tool_record(address="boss@company.com"):
    """A LLaMA-Factory glaive-style send_email exchange in canonical form."""
    tools = json.dumps([{"name": "send_email", "parameters": {"type": "object", "properties": {
        "recipient": {"type": "string", "format": "email"}, "subject": {"type": "string"}}}}])  # fmt: skip
    arguments = json.dumps({"recipient": address, "cc": ["ann@example.org"], "subject": "Update", "n": 1})
    messages = [
        {"role": "user", "content": f"Mail {address} and cc ann@example.org, subject Update."},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "send_email", "arguments": arguments}]},
        {"role": "tool", "content": json.dumps({"status": "sent", "to": address, "line": "to\n" + address})},
        {"role": "assistant", "content": f"Sent to {address}."},
    ]
    return make_record(messages, tools)


def test_pii_in_tool_calls_is_redacted_consistently_and_arguments_stay_valid_json():
    record = tool_record()
    cleaner = Cleaner(CleanSpec())
    [(cleaned, reason)] = cleaner.clean_batch([record])
    assert reason is None and cleaned["tools"] == record["tools"]
    arguments = json.loads(cleaned["messages"][1]["tool_calls"][0]["arguments"])
    assert arguments == {"recipient": "user1@example.com", "cc": ["ann@example.org"], "subject": "Update",
                         "n": 1}  # fmt: skip
    assert json.loads(cleaned["messages"][2]["content"]) == {
        "status": "sent", "to": "user1@example.com", "line": "to\nuser1@example.com"}  # fmt: skip
    assert "user1@example.com" in cleaned["messages"][0]["content"] and "boss@" not in json.dumps(cleaned)
    assert cleaned["messages"][3]["content"] == "Sent to user1@example.com."
    assert cleaner.stats()["pii_redacted"]["email"] == 5


def test_pii_in_a_distilled_answers_reasoning_is_redacted_too():
    record = make_record([
        {"role": "user", "content": "Who should get the report?"},
        {"role": "assistant", "content": "Send it to the team lead.",
         "reasoning_content": "The lead is jane.doe@acme-corp.com, per the thread; she asked first."},
    ])  # fmt: skip
    cleaner = Cleaner(CleanSpec())
    [(cleaned, reason)] = cleaner.clean_batch([record])
    assert reason is None and "jane.doe@" not in json.dumps(cleaned)
    assert cleaned["messages"][1]["reasoning_content"].startswith("The lead is user1@example.com")
    assert cleaner.stats()["pii_redacted"]["email"] == 1


def test_pii_action_per_kind_redact_drop_or_report():
    record = tool_record()
    cleaner = Cleaner(CleanSpec(pii={"email": "report"}))
    [(reported, reason)] = cleaner.clean_batch([record])
    assert reason is None and reported == record
    assert cleaner.stats()["pii_reported"] == {"email": 5}
    assert reasons([record], pii={"email": "drop"}) == ["pii_email"]
    assert reasons([tool_record("bob@example.com")], pii={"email": "drop"}) == [None]


def test_old_redact_pii_list_still_loads_with_a_message():
    with pytest.warns(FutureWarning, match="clean.redact_pii is now clean.pii"):
        spec = CleanSpec(redact_pii=["email"])
    assert spec.pii.model_dump() == {"email": "redact", "phone": "report", "ip": "report", "card": "report",
                                     "secret": "report"}  # fmt: skip


def test_recipe_schema_says_what_each_html_and_pii_value_does():
    from tuneline.recipe import Recipe

    schema = json.dumps(Recipe.model_json_schema())
    for phrase in ("auto: strip them only in records taken from web pages", "drop: drop every record",
                   "keep: never look", "report: count it, change nothing", "user1@example.com"):  # fmt: skip
        assert phrase in schema


def test_language_filter_keeps_allowed_languages():
    english = conv("How do I reset my password?", "Open the settings page and choose reset password.")
    german = conv(
        "Wie setze ich mein Passwort zurück?", "Öffnen Sie die Einstellungen und wählen Sie Zurücksetzen."
    )
    assert reasons([english, german], languages=["en"]) == [None, "language_not_allowed"]


def test_near_duplicates_are_dropped_first_kept():
    base = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day in june"
    records = [
        conv("tell me a story", base),
        conv("tell me a story", base + " again"),
        conv("other", "x y z w"),
    ]
    assert reasons(records) == [None, "near_duplicate", None]
    assert reasons(records, near_dedup=False) == [None, None, None]


def test_near_dedup_is_deterministic_and_pairs_are_found():
    texts = [f"record number {i} has some words that repeat across the set of texts" for i in range(3)]
    texts.append("completely different content about cooking pasta with tomatoes and basil")
    first = NearDedup(0.5, 3, 64).flags(texts)
    assert first == NearDedup(0.5, 3, 64).flags(texts)
    pairs = near_duplicate_pairs(texts, 0.5, 3, 64)
    assert {(a, b) for a, b, _ in pairs} <= {(0, 1), (0, 2), (1, 2)} and pairs
    assert choose_bands(64, 0.8) == 8


def test_stage_ledger_and_stats(tmp_path):
    records = [conv(f"question {i} about things", f"answer {i} with detail") for i in range(25)]
    records += [records[0], conv("mail me at bob@mailhost.io please", "sure thing")]
    with write_stage(tmp_path, "collect", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    ref = run_clean(
        tmp_path, find_stage(tmp_path, "collect", "in"), CleanSpec(batch_size=4, near_dedup=False)
    )
    assert read_manifest(ref)["ledger"] == {"in": 27, "out": 26, "dropped": {"duplicate": 1}}
    assert read_stats(ref)["pii_redacted"]["email"] == 1
    assert any("user1@example.com" in r["messages"][0]["content"] for r in iter_records(ref))


def test_split_drops_training_records_overlapping_held_out_and_benchmarks(tmp_path):
    from tuneline.curate.split import run_split
    from tuneline.recipe import SplitSpec

    long_tail = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    records = [conv(f"question {i} " + long_tail, f"answer {i}") for i in range(60)]
    records += [conv("a benchmark item: what is the capital city of france asked in a quiz show today", "x")]
    bench = tmp_path / "bench.txt"
    bench.write_text("A benchmark item: what is the capital city of France, asked in a quiz show today?\n")
    with write_stage(tmp_path, "gate", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    spec = SplitSpec(validation=0.2, test=0.2, benchmarks=[str(bench)])
    ref = run_split(tmp_path, find_stage(tmp_path, "gate", "in"), spec)
    ledger = read_manifest(ref)["ledger"]
    stats = read_stats(ref)
    held_out = stats["counts"]["validation"] + stats["counts"]["test"]
    assert held_out > 0
    # every training record shares the long tail with a held-out one, and the benchmark one is out too
    assert stats["counts"]["train"] == 0 and ledger["dropped"] == {"contaminated": 61 - held_out}
    assert ledger["in"] == 61 == ledger["out"] + ledger["dropped"]["contaminated"]
    clean = run_split(tmp_path, find_stage(tmp_path, "gate", "in"), SplitSpec(decontaminate=False))
    assert read_manifest(clean)["ledger"]["dropped"] == {}


def test_benchmark_prompts_alone_contaminate(tmp_path):
    from tuneline.curate.split import run_split
    from tuneline.recipe import SplitSpec

    records = [conv(f"distinct question number {i}", f"answer {i}") for i in range(20)]
    records.append(
        conv("Tell me: what is the capital city of France, asked in a quiz show today please", "Paris")
    )
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        '{"prompt": "what is the capital city of France asked in a quiz show today", "completion": "?"}\n'
    )
    with write_stage(tmp_path, "gate", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    spec = SplitSpec(validation=0, test=0, benchmarks=[str(bench)], decontaminate_ngram=8)
    ref = run_split(tmp_path, find_stage(tmp_path, "gate", "in"), spec)
    assert read_manifest(ref)["ledger"] == {"in": 21, "out": 20, "dropped": {"contaminated": 1}}
    assert "Paris" in ref.file("rejects.jsonl").read_text()


def test_lineage_funnel_follows_manifests_back_to_collect(tmp_path):
    from tuneline.curate.split import run_split
    from tuneline.recipe import SplitSpec
    from tuneline.report import lineage_funnel

    records = [conv(f"question {i} about things", f"answer {i} with detail") for i in range(10)]
    with write_stage(tmp_path, "collect", "in") as writer:
        for record in [*records, records[0]]:
            writer.count_in()
            writer.keep(record)
    cleaned = run_clean(tmp_path, find_stage(tmp_path, "collect", "in"), CleanSpec())
    splits = run_split(tmp_path, cleaned, SplitSpec())
    funnel = lineage_funnel(tmp_path, splits)
    assert [row["stage"] for row in funnel] == ["collect", "clean", "split"]
    assert funnel[1] == {"stage": "clean", "in": 11, "out": 10, "dropped": {"duplicate": 1}}


def test_worker_processes_give_the_same_stage(tmp_path):
    base = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day"
    records = [conv(f"question {i % 17} about {base}", f"answer {i % 13}") for i in range(40)]
    with write_stage(tmp_path, "collect", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    collected = find_stage(tmp_path, "collect", "in")
    inline = run_clean(tmp_path / "one", collected, CleanSpec(batch_size=7, workers=1))
    parallel = run_clean(tmp_path / "two", collected, CleanSpec(batch_size=7, workers=2))
    assert read_manifest(inline)["ledger"] == read_manifest(parallel)["ledger"]
    assert read_manifest(inline)["ledger"]["dropped"]["near_duplicate"] > 0
    assert inline.file("records.jsonl").read_text() == parallel.file("records.jsonl").read_text()


def test_crawled_pairs_are_marked_as_web_text_so_html_auto_strips_their_leftover_tags(tmp_path):
    from tuneline.recipe import CrawlSource
    from tuneline.sources.collect import run_collect
    from tuneline.sources.crawl import ITEMS

    item = {"url": "https://faq.test/hours", "fetched_at": "2026-01-01T00:00:00Z", "title": "FAQ",
            "question": "Opening&nbsp;hours?", "answer": "<b>From nine</b> to five."}  # fmt: skip
    with write_stage(tmp_path, "fetch", "crawl") as writer:
        writer.count_in()
        writer.keep(item, ITEMS)
    source = CrawlSource(
        name="faq", mode="pairs", start_urls=["https://faq.test/"], pair="div", question="h3", answer="p"
    )
    collected = run_collect(tmp_path, [source], [find_stage(tmp_path, "fetch", "crawl")])
    [record] = iter_records(run_clean(tmp_path, collected, CleanSpec()))
    assert record["meta"]["source_kind"] == "crawl"
    assert [m["content"] for m in record["messages"]] == ["Opening\u00a0hours?", "From nine to five."]
