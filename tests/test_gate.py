"""The quality gate: a real Great Expectations run over a small cleaned stage.

Checks what a user relies on: good data passes through untouched with GE's result beside it; bad
data stops the run with every failed expectation and sample record ids in the message; the
recipe's thresholds decide; a finished gate is reused; a failed one leaves no stage behind.
"""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tuneline.curate import gate
from tuneline.curate.gate import GateFailed, SuiteError, run_gate
from tuneline.recipe import GateSpec
from tuneline.records import make_record
from tuneline.store import find_stage, iter_records, read_manifest, read_stats, write_stage


def conversation(question: str, answer: str, *, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return make_record(messages, meta={"source": "test"})


def good_records(n: int = 30) -> list[dict]:
    return [
        conversation(f"How do I reset password number {i}?", f"Open settings, step {i}.") for i in range(n)
    ]


def cleaned_stage(artifacts_dir: Path, records: list[dict], name: str = "c1"):
    """A finished `clean` stage holding exactly these records."""
    with write_stage(artifacts_dir, "clean", name) as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    return find_stage(artifacts_dir, "clean", name)


def gate_dirs(artifacts_dir: Path) -> list[Path]:
    folder = artifacts_dir / "stages" / "gate"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_passing_data_goes_through_with_validation_result_and_docs(tmp_path):
    records = good_records()
    cleaned = cleaned_stage(tmp_path, records)
    gated = run_gate(tmp_path, cleaned, GateSpec(min_records=10))
    assert list(iter_records(gated)) == records
    assert read_manifest(gated)["ledger"] == {"in": 30, "out": 30, "dropped": {}}
    stats = read_stats(gated)
    assert len(stats["expectations"]) == 12 and all(row["success"] for row in stats["expectations"])
    assert stats["parameters"] == {
        "min_records": 10,
        "min_chars": 1,
        "max_chars": 20_000,
        "max_tokens": None,
        "min_unique_share": 1.0,
        "languages": [],
        "min_language_share": 0.95,
        "max_label_share": 1.0,
        "mostly": 0.99,
    }
    validation = json.loads(gated.file("validation.json").read_text())
    assert validation["success"] is True
    assert gated.file("data_docs/index.html").is_file()


class AssetsLoaded(HTMLParser):
    """The URLs a browser fetches to show a page: stylesheets, icons, scripts, images (not <a> links)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") in ("stylesheet", "icon", "shortcut icon"):
            self.urls.append(attrs["href"])
        elif tag in ("script", "img") and attrs.get("src"):
            self.urls.append(attrs["src"])


def test_data_docs_load_nothing_from_outside_their_folder(tmp_path):
    gated = run_gate(tmp_path, cleaned_stage(tmp_path, good_records()), GateSpec(min_records=10))
    docs = gated.dir / "data_docs"
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) >= 3  # the index, the suite, the validation result
    for page in pages:
        parser = AssetsLoaded()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.urls, page
        for url in parser.urls:
            assert "://" not in url, f"{page.relative_to(docs)} loads {url}"
            assert (page.parent / url).resolve().is_file(), f"{page.relative_to(docs)}: {url} is missing"
    assert "bootstrap.min.css" in (docs / "index.html").read_text()


def test_failing_data_lists_each_failed_expectation_with_sample_ids_and_leaves_no_stage(tmp_path):
    blank_answer = conversation("What are your opening hours?", "   ")
    blank_question = conversation(" \n ", "We open at nine.")
    ends_on_user = make_record(
        [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Are you there?"}]
    )
    records = [*good_records(), blank_answer, blank_question, ends_on_user, good_records(1)[0]]
    cleaned = cleaned_stage(tmp_path, records)
    with pytest.raises(GateFailed) as caught:
        run_gate(tmp_path, cleaned, GateSpec(min_records=10, examples=2))
    message = str(caught.value)
    failed = {line.split(":")[0] for line in caught.value.failures}
    assert failed == {
        "expect_column_values_to_be_unique on id",
        "expect_column_proportion_of_unique_values_to_be_between on id",
        "expect_column_values_to_not_match_regex on assistant_text",
        "expect_column_values_to_not_match_regex on user_text",
        "expect_column_values_to_be_between on user_chars",
        "expect_column_values_to_be_between on assistant_chars",
        "expect_column_values_to_be_in_set on last_role",
    }
    assert blank_answer["id"] in message and blank_question["id"] in message and ends_on_user["id"] in message
    assert '"Hello! Are you there?"' in message  # a short excerpt of the failing record
    assert "expected mostly=0.99, min_value=1" in message
    assert gate_dirs(tmp_path) == []  # neither a stage nor a temporary folder


@pytest.mark.parametrize(
    ("quality", "passes"),
    [
        (GateSpec(min_records=10), True),
        (GateSpec(min_records=10, min_chars=5), False),  # the two "Yes." answers are too short
        (GateSpec(min_records=10, min_chars=5, mostly=0.9), True),  # ... unless 10% may fail
        (GateSpec(min_records=10, max_chars=20), False),  # every question is longer than 20
        (GateSpec(min_records=31), False),
    ],
)
def test_recipe_thresholds_decide_the_outcome(tmp_path, quality, passes):
    short_answers = [conversation(f"Is it open on day {i}?", "Yes.") for i in range(2)]
    cleaned = cleaned_stage(tmp_path, [*good_records(28), *short_answers])
    if passes:
        run_gate(tmp_path, cleaned, quality)
    else:
        with pytest.raises(GateFailed, match="expect_"):
            run_gate(tmp_path, cleaned, quality)


def test_row_count_failure_names_the_observed_count_and_threshold(tmp_path):
    cleaned = cleaned_stage(tmp_path, good_records(5))
    with pytest.raises(GateFailed) as caught:
        run_gate(tmp_path, cleaned, GateSpec(min_records=10000))
    (failure,) = caught.value.failures
    assert failure == "expect_table_row_count_to_be_between: observed 5; expected min_value=10000"


def test_finished_gate_is_reused_without_running_great_expectations(tmp_path, monkeypatch):
    cleaned = cleaned_stage(tmp_path, good_records())
    first = run_gate(tmp_path, cleaned, GateSpec())

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached gate ran the suite again")

    monkeypatch.setattr(gate, "validate_frame", must_not_run)
    assert run_gate(tmp_path, cleaned, GateSpec()) == first
    with pytest.raises(AssertionError, match="ran the suite again"):  # a new threshold is a new stage
        run_gate(tmp_path, cleaned, GateSpec(min_chars=3))


def test_suite_file_loads_every_expectation():
    suite_file = gate.suite_path("conversations")
    suite = gate.load_suite(suite_file)
    assert len(suite.expectations) == len(json.loads(suite_file.read_text())["expectations"]) == 12
    columns = {e.column for e in suite.expectations if hasattr(e, "column")}
    assert columns <= set(gate.records_frame([]).columns)


def test_unknown_expectation_type_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"name": "bad", "expectations": [{"type": "expect_custom_thing", "kwargs": {}}]})
    )
    with pytest.raises(ValueError, match="bad.json: .*expect_custom_thing"):
        gate.load_suite(bad)


def test_expectation_on_a_missing_column_fails_with_its_error(tmp_path, monkeypatch):
    suite = json.loads(gate.suite_path("conversations").read_text())
    suite["expectations"].append(
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "nope"}}
    )
    (tmp_path / "typo.json").write_text(json.dumps(suite))
    monkeypatch.setattr(gate, "EXPECTATIONS_DIR", tmp_path)
    cleaned = cleaned_stage(tmp_path, good_records())
    with pytest.raises(GateFailed) as caught:
        run_gate(tmp_path, cleaned, GateSpec(suite="typo"))
    (failure,) = caught.value.failures
    assert failure.startswith("expect_column_values_to_not_be_null on nope: could not run: ")
    assert "nope" in failure.split("could not run: ")[1]


def test_unknown_suite_name_names_the_recipe_field(tmp_path):
    cleaned = cleaned_stage(tmp_path, good_records())
    with pytest.raises(SuiteError, match="gate.suite: 'nope'"):
        run_gate(tmp_path, cleaned, GateSpec(suite="nope"))


def test_row_takes_the_weakest_turn_of_each_role():
    record = make_record(
        [
            {"role": "user", "content": "A long enough question"},
            {"role": "assistant", "content": "A fine answer"},
            {"role": "user", "content": "  "},
            {"role": "assistant", "content": "ok"},
        ]
    )
    row = gate.conversation_row(record)
    assert (row["user_text"], row["user_chars"]) == ("", 0)
    assert (row["assistant_text"], row["assistant_chars"]) == ("ok", 2)
    assert (row["longest_turn_chars"], row["n_turns"], row["last_role"]) == (22, 4, "assistant")


@pytest.mark.parametrize(
    ("quality", "failed"),
    [
        (GateSpec(max_label_share=0.5), "expect_column_max_to_be_between on answer_share"),
        (GateSpec(languages=["de"]), "expect_column_values_to_be_in_set on language"),
        (GateSpec(max_tokens=5), "expect_column_values_to_be_between on tokens"),
    ],
)
def test_label_balance_language_share_and_token_bounds(tmp_path, quality, failed):
    records = [conversation(f"Classify ticket {i}", "billing" if i % 4 else "refund") for i in range(20)]
    records = [{**r, "meta": {**r["meta"], "language": "en", "tokens": 9}} for r in records]
    with pytest.raises(GateFailed) as caught:
        run_gate(tmp_path, cleaned_stage(tmp_path, records), quality)
    assert [line.split(":")[0] for line in caught.value.failures] == [failed]
    run_gate(tmp_path, cleaned_stage(tmp_path, records, "c2"), GateSpec(max_label_share=0.8))


def test_duplicate_rate_bound_and_documents_suite(tmp_path):
    records = good_records(20)
    records = [*records, records[0]]
    lenient = GateSpec(max_duplicate_rate=0.1, mostly=0.9)
    run_gate(tmp_path, cleaned_stage(tmp_path, records), lenient)
    with pytest.raises(GateFailed, match="proportion_of_unique"):
        run_gate(tmp_path, cleaned_stage(tmp_path, records, "c2"), GateSpec(mostly=0.9))
    docs = run_gate(tmp_path, cleaned_stage(tmp_path, good_records(12), "c3"), GateSpec(suite="documents"))
    assert read_stats(docs)["suite"] == "documents" and read_manifest(docs)["ledger"]["out"] == 12


def test_the_gate_judges_shares_not_single_records(tmp_path):
    """One blank answer in 150 records is clean's to drop; the gate stops data bad in bulk."""
    one_bad = [*good_records(150), conversation("What are your opening hours?", " ")]
    run_gate(tmp_path, cleaned_stage(tmp_path, one_bad), GateSpec())
    with pytest.raises(GateFailed, match="assistant_text: 1 of 151 rows"):  # a recipe may still be strict
        run_gate(tmp_path, cleaned_stage(tmp_path, one_bad, "c2"), GateSpec(mostly=1.0))
    many_bad = [*good_records(150), *(conversation(f"Opening hours on day {i}?", " ") for i in range(10))]
    with pytest.raises(GateFailed) as caught:
        run_gate(tmp_path, cleaned_stage(tmp_path, many_bad, "c3"), GateSpec())
    assert "expect_column_values_to_not_match_regex on assistant_text: 10 of 160 rows" in str(caught.value)
    assert "expected mostly=0.99" in str(caught.value)


def test_one_character_labels_and_words_pass_the_default_gate(tmp_path):
    """Multiple-choice letters, digit labels and a one-character greeting (嗨) are real turns."""
    records = [conversation(f"Question {i}: which option, A to D?", "ABCD"[i % 4]) for i in range(40)]
    records += [conversation(f"Rate review {i} from 1 to 5", str(1 + i % 5)) for i in range(20)]
    records.append(conversation("嗨", "嗨！很高兴与您相遇。"))
    gated = run_gate(tmp_path, cleaned_stage(tmp_path, records), GateSpec())
    assert read_manifest(gated)["ledger"]["out"] == 61


def tool_calling(i: int) -> dict:
    """A LLaMA-Factory glaive-style record: the first answer only calls a tool."""
    call = {"name": "search_recipes", "arguments": json.dumps({"ingredients": [f"item {i}"]})}
    return make_record(
        [
            {"role": "user", "content": f"Find me a recipe with item {i}."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": json.dumps({"recipes": [f"Stir fry {i}"]})},
            {"role": "assistant", "content": f"I found one recipe for you: Stir fry with item {i}."},
        ],
        tools=json.dumps([{"name": "search_recipes", "parameters": {"type": "object"}}]),
    )


def test_a_turn_that_only_calls_a_tool_is_content(tmp_path):
    row = gate.conversation_row(tool_calling(0))
    assert row["assistant_text"] == 'search_recipes({"ingredients": ["item 0"]})'
    assert row["assistant_chars"] == len(row["assistant_text"])
    records = [*good_records(10), *(tool_calling(i) for i in range(10))]
    strict = GateSpec(mostly=1.0, min_chars=2)  # passes on its merit, not by tolerance
    gated = run_gate(tmp_path, cleaned_stage(tmp_path, records), strict)
    assert all(row["success"] for row in read_stats(gated)["expectations"])
