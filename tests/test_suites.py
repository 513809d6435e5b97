"""Test suites: a suite file with each assertion kind, the checks' reasons, and bad files' errors."""

from __future__ import annotations

import pytest

from tuneline.evaluate import suites

SUITE = """\
system: Label the message.
cases:
  - name: refund
    prompt: money back please
    assert:
      - equals: refund
      - contains: REF
      - regex: "^[a-z_]+$"
  - name: json
    prompt: as JSON
    system: Answer in JSON.
    assert:
      - json_schema: {type: object, required: [intent]}
  - name: count
    prompt: how many?
    assert:
      - numeric: 42
        tolerance: 0.5
      - rubric: Polite and short
"""


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE, encoding="utf-8")
    return path


def test_suite_file_with_every_kind(suite_file):
    suite = suites.load_suite(suite_file)
    assert [a.kind for c in suite.cases for a in c.assertions] == [
        "equals",
        "contains",
        "regex",
        "json_schema",
        "numeric",
        "rubric",
    ]
    assert suite.conversations()[0][0] == {"role": "system", "content": "Label the message."}
    assert suite.conversations()[1][0]["content"] == "Answer in JSON."  # a case's own system turn

    rows = suites.run_checks("s", suite, ["Refund", '{"intent": "refund"}', "about 42.3 of them"])
    assert [row["passed"] for row in rows] == [True, True, False, True, True, None]
    assert rows[2]["reason"] == "/^[a-z_]+$/ does not match 'Refund'"
    assert rows[5]["reason"] == "not run: no judge configured"
    summary = suites.summarize(rows)
    assert summary["pass_rate"] == pytest.approx(4 / 5)  # the rubric is not counted as run
    assert summary["by_kind"]["rubric"] == {
        "passed": 0,
        "failed": 0,
        "not_run": 1,
        "pass_rate": None,
        "reason": "not run: no judge configured",
    }


@pytest.mark.parametrize(
    ("assertion", "reply", "passed", "reason"),
    [
        ({"equals": "refund"}, "refund please", False, "expected 'refund', got 'refund please'"),
        ({"equals": "Refund", "ignore_case": False}, "refund", False, "expected 'Refund', got 'refund'"),
        ({"contains": "order"}, "<think>order?</think>refund", False, "'order' not in 'refund'"),
        ({"json_schema": {"type": "object"}}, "not json", False, "not JSON: 'not json'"),
        ({"json_schema": {"required": ["a"]}}, "{}", False, "(root): 'a' is a required property"),
        ({"numeric": 10, "tolerance": 1}, "it costs 1,200", False, "1200 is not within 1 of 10"),
        ({"numeric": 10}, "ten", False, "no number in 'ten'"),
        ({"numeric": -2.5}, "-2.5", True, ""),
    ],
)
def test_check_reasons(assertion, reply, passed, reason):
    assert suites.check(suites.Assertion(**assertion), reply) == (passed, reason)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "cases:\n  - prompt: hi\n    assert:\n      - regex: '(unclosed'\n",
            "suite.yaml:2: case 1: assert[0].regex: Value error, not a valid regular expression",
        ),
        (
            "cases:\n  - prompt: a\n    assert: [{equals: x}]\n  - name: two\n    prompt: b\n"
            "    assert:\n      - equals: x\n        contains: y\n",
            'suite.yaml:4: case 2 ("two"): assert[0]: give exactly one of',
        ),
        ("cases:\n  - name: nothing\n    assert: [{equals: x}]\n", 'case 1 ("nothing"): prompt: required'),
        ("cases:\n  - prompt: a\n    asserts: []\n", "case 1: asserts: unknown key; use one of prompt"),
        ("cases:\n  - prompt: a\n    assert: [{json_schema: {type: 12}}]\n", "not a valid JSON Schema"),
        ("cases: [\n", "suite.yaml:2: not valid YAML"),
    ],
)
def test_bad_suite_names_file_case_and_field(tmp_path, text, expected):
    path = tmp_path / "suite.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(suites.SuiteError) as raised:
        suites.load_suite(path)
    assert str(path.parent) in str(raised.value)
    assert expected.replace("Value error, ", "") in str(raised.value)


def test_missing_suite_file(tmp_path):
    with pytest.raises(suites.SuiteError, match="cannot read the test suite .*fix evaluate.suites"):
        suites.load_suite(tmp_path / "nope.yaml")


def test_shipped_example_suite_loads():
    suite = suites.load_suite("recipes/suites/support_intents.yaml")
    assert len(suite.cases) >= 5
