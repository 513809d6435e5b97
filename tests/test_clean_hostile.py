"""Malformed and hostile inputs through collect -> clean (-> gate): each ends in a reject with its
reason (collect rejects name FILE:LINE), a repair, or a clear error; none crashes a stage and no
record disappears (every stage's ledger adds up, and collect's out is clean's in)."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from tuneline.cli.data import data_app
from tuneline.curate.clean import run_clean
from tuneline.recipe import CleanSpec, FileSource
from tuneline.sources.collect import SourceError, run_collect
from tuneline.store import iter_records, read_manifest, read_stats

SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def alpaca(q, a) -> bytes:
    return line({"instruction": q, "input": "", "output": a})


def openai(*turns) -> bytes:
    return line({"messages": [{"role": r, "content": c} for r, c in turns]})


GOOD = alpaca("How do I reset my password?", "Open settings and choose reset.")

# (case, file bytes, expected: Counter of collect drop details' "line: reason" fragments or clean reasons)
CASES = [
    (
        "invalid_utf8",
        GOOD + b'{"instruction": "caf\xe9 \xff", "output": "x"}\n',
        {"collect": ":2: invalid UTF-8"},
    ),
    ("truncated_json", GOOD + b'{"instruction": "How do I', {"collect": ":2: invalid JSON"}),
    ("wrong_types", GOOD + line({"instruction": 5, "output": ["a"]}), {"collect": ":2: instruction"}),
    ("missing_fields", GOOD + line({"instruction": "only a question"}), {"collect": ":2: output"}),
    ("not_an_object", GOOD + b"[1, 2, 3]\n", {"collect": ":2: expected a JSON object"}),
    (
        "deep_nesting",
        GOOD + b'{"instruction": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
        {"collect": ":2: "},
    ),
    (
        "lone_surrogate",
        GOOD + b'{"instruction": "bad \\ud800", "output": "x"}\n',
        {"collect": ":2: text holds"},
    ),
    (
        "mixed_formats",
        GOOD + line({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
        {"collect": ":2: instruction: missing"},
    ),
    (
        "roles_out_of_order",
        openai(("user", "first question"), ("user", "second"), ("assistant", "an answer")),
        {"clean": "roles_out_of_order"},
    ),
    (
        "ends_on_user",
        openai(("user", "question one"), ("assistant", "answer one"), ("user", "and then?")),
        {"clean": "last_turn_not_assistant"},
    ),
    (
        "tool_without_call",
        openai(("user", "weather?"), ("assistant", "let me see"), ("tool", "sunny"), ("assistant", "Sunny.")),
        {"clean": "tool_turn_malformed"},
    ),
    ("blank_answer", alpaca("A real question here?", " \u3000 "), {"clean": "empty_turn"}),
    ("ten_mb_record", alpaca("Summarize this:", "word " * 2_000_000), {"clean": "too_long"}),
    ("duplicate_lines", GOOD + GOOD, {"clean": "duplicate"}),
    (
        "zero_width",
        alpaca("pass\u200bword re\u200dset?\ufeff", "Open settings."),
        {"repaired": "control_chars"},
    ),
    ("null_bytes", alpaca("a\u0000b question", "fine answer"), {"repaired": "control_chars"}),
    ("mojibake", alpaca("Caf\u00c3\u00a9 opening hours?", "From nine."), {"repaired": "mojibake"}),
    # Markup in a dataset file is the record's content by default (clean.html: auto strips web pages only).
    ("markup_in_a_file", alpaca("<p>Opening&nbsp;hours?</p>", "<b>From nine.</b>"), {"unchanged": True}),
    (
        "secret_in_prompt",
        alpaca(f"My key {SECRET} fails, mail me at a@b.io", "Rotate it."),
        {"pii": "secret"},
    ),
]


def run_case(tmp_path, name, data):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    collected = run_collect(tmp_path / "store", [FileSource(name="hostile", path=str(path))])
    cleaned = run_clean(tmp_path / "store", collected, CleanSpec())
    return path, collected, cleaned


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_ends_in_a_reason_never_a_crash_or_a_loss(tmp_path, name, data, expected):
    path, collected, cleaned = run_case(tmp_path, name, data)
    collect_ledger, clean_ledger = read_manifest(collected)["ledger"], read_manifest(cleaned)["ledger"]
    for ledger in (collect_ledger, clean_ledger):
        assert ledger["in"] == ledger["out"] + sum(ledger["dropped"].values())
    assert clean_ledger["in"] == collect_ledger["out"]
    collect_rejects = [json.loads(x) for x in collected.file("rejects.jsonl").read_text().splitlines()]
    clean_reasons = Counter(
        json.loads(x)["reason"] for x in cleaned.file("rejects.jsonl").read_text().splitlines()
    )
    stats = read_stats(cleaned)
    if "collect" in expected:
        assert [r["reason"] for r in collect_rejects] == ["unreadable"]
        assert collect_rejects[0]["detail"].startswith(f"{path}{expected['collect']}")
    elif "clean" in expected:
        assert clean_reasons[expected["clean"]] == 1 and not collect_rejects
    elif "unchanged" in expected:
        (record,) = iter_records(cleaned)
        assert record == next(iter_records(collected)) and stats["repaired"] == {}
    elif "repaired" in expected:
        assert stats["repaired"][expected["repaired"]] >= 1 and clean_ledger["out"] == 1
        text = json.dumps(list(iter_records(cleaned)))
        assert "\\u200b" not in text and "\\u0000" not in text and "<p>" not in text and "\\u00c3" not in text
    else:
        assert stats["pii_redacted"] == {"email": 1, "phone": 0, "ip": 0, "card": 0, "secret": 1}
        (record,) = iter_records(cleaned)
        assert SECRET not in json.dumps(record) and "<SECRET>" in record["messages"][0]["content"]


@pytest.mark.parametrize("data", [b"", b"\n\n   \n"], ids=["empty_file", "only_blank_lines"])
def test_input_without_records_stops_at_collect_naming_source_and_file(tmp_path, data):
    with pytest.raises(SourceError, match=rf"source 'hostile': {tmp_path / 'empty.jsonl'} holds no records"):
        run_case(tmp_path, "empty", data)


def test_data_check_names_file_and_line_and_reports_the_funnel(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [alpaca(f"Question number {i} about the product?", f"Answer {i}.") for i in range(12)]
    path.write_bytes(
        b"".join(good[:7]) + b'{"instruction": "trunc' + b"\n" + good[0] + alpaca("q", f"key {SECRET}")
    )
    result = CliRunner().invoke(data_app, ["check", str(path)])
    assert result.exit_code == 1, result.output  # 8 records out: too few for the gate
    assert f"{path}:8: invalid JSON" in result.output
    assert (
        "1 × duplicate" in result.output
        and "secret: 1" in result.output
        and "records out: 8" in result.output
    )
    assert "quality gate (conversations): FAILED" in result.output
    assert "expect_table_row_count_to_be_between: observed 8; expected min_value=10" in result.output
    good_path = tmp_path / "good.jsonl"
    good_path.write_bytes(b"".join(good))
    passed = CliRunner().invoke(data_app, ["check", str(good_path)])
    assert passed.exit_code == 0 and "quality gate (conversations): passed" in passed.output
    missing = CliRunner().invoke(data_app, ["check", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "no such file" in missing.output
