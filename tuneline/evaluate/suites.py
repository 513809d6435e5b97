"""Test suites: YAML files of cases (a prompt and assertions on the reply) that the evaluate stage
runs on the base and the tuned model.

A suite file:

    system: Label the customer-support message with its intent.   # optional, every case's system turn
    cases:
      - name: refund                                               # optional; "case N" otherwise
        prompt: I want my money back for order 123.
        assert:
          - equals: refund              # the final answer, stripped (ignore_case: true by default)
          - contains: ref               # a substring (ignore_case: true by default)
          - regex: "^[a-z_]+$"          # re.search on the final answer
          - json_schema: {type: object} # the reply parses as JSON and validates
          - numeric: 42                 # the first number in the reply, within `tolerance`
            tolerance: 0.5
          - rubric: Polite and on topic # asked of the LLM judge (evaluate.judge); not run without one

Each assertion gives passed / failed with a reason, or "not run" with a reason (a rubric).
Pass rates are per assertion kind and overall (passed / run).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneline.errors import UserError
from tuneline.evaluate.metrics import final_answer, parse_json, schema_errors

Kind = Literal["equals", "contains", "regex", "json_schema", "numeric", "rubric"]
KINDS: tuple[Kind, ...] = ("equals", "contains", "regex", "json_schema", "numeric", "rubric")
NO_JUDGE = "not run: no judge configured"
# Decides rubric assertions in one batch: (rubric, conversation turns, reply) in, (passed, why) out
# (tuneline.evaluate.judge.rubric_judge makes one from evaluate.judge).
RubricJudge = Callable[[list[tuple[str, list[dict[str, str]], str]]], list[tuple[bool | None, str]]]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class SuiteError(UserError, ValueError):
    """A suite file that cannot be used; the message names the file, line, case and field."""


class Assertion(BaseModel):
    """One check on a reply: exactly one of the kind keys is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    equals: str | None = None
    contains: str | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | bool | None = None
    numeric: float | None = None
    rubric: str | None = None
    ignore_case: bool = Field(True, description="equals and contains: compare casefolded.")
    tolerance: float = Field(0.0, ge=0, description="numeric: how far the reply's number may be.")

    @property
    def kind(self) -> Kind:
        """Which check this is."""
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @model_validator(mode="after")
    def _one_kind(self) -> Assertion:
        chosen = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(chosen) or 'none'})")
        return self

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return pattern

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | bool | None) -> dict[str, Any] | bool | None:
        if schema is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as error:
                raise ValueError(f"not a valid JSON Schema: {error.message}") from None
        return schema


class Case(BaseModel):
    """A prompt and what its reply must satisfy."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str | None = None
    prompt: str = Field(min_length=1)
    system: str | None = None
    assertions: list[Assertion] = Field(alias="assert", min_length=1)


class Suite(BaseModel):
    """A suite file: an optional system prompt for every case, and the cases."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str | None = None
    cases: list[Case] = Field(min_length=1)

    def conversations(self) -> list[list[dict[str, str]]]:
        """Each case as the turns a model replies to."""
        turns = []
        for case in self.cases:
            system = case.system if case.system is not None else self.system
            head = [{"role": "system", "content": system}] if system else []
            turns.append([*head, {"role": "user", "content": case.prompt}])
        return turns


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; a problem raises SuiteError naming file, line, case and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError as error:
        raise SuiteError(
            f"{path}: cannot read the test suite ({error.strerror}); fix evaluate.suites"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SuiteError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    try:
        return Suite.model_validate(data)
    except ValidationError as error:
        lines = case_lines(text)
        problems = [describe_problem(path, e, lines, data) for e in error.errors()]
        raise SuiteError(
            f"{path}: {len(problems)} problem(s) in the test suite\n  " + "\n  ".join(problems)
        ) from None


def case_lines(text: str) -> list[int]:
    """The 1-based line where each case starts, from the YAML node tree (none if not a list)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "cases" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def describe_problem(path: Path, error: dict[str, Any], lines: list[int], data: Any) -> str:
    """One validation error as 'file:line: case N (name): field: message (got value)'."""
    loc = list(error["loc"])
    where, field = f"{path}", loc
    if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
        index = loc[1]
        line = f":{lines[index]}" if index < len(lines) else ""
        name = case_name(data, index)
        where, field = f"{path}{line}: case {index + 1}{name}", loc[2:]
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in field]
    field_text = ".".join(parts).replace(".[", "[") or "(case)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: {field_text}: required, but missing"
    if error["type"] == "extra_forbidden":
        known = "prompt, system, name, assert" if field_text.count(".") == 0 else ", ".join(KINDS)
        return f"{where}: {field_text}: unknown key; use one of {known}"
    shown = json.dumps(error.get("input"), default=str)
    return f"{where}: {field_text}: {message} (got {shown[:80]})"


def case_name(data: Any, index: int) -> str:
    """' ("name")' of the case at `index` in the raw suite data, when it has a name; else ''."""
    cases = data.get("cases") if isinstance(data, dict) else None
    case = cases[index] if isinstance(cases, list) and index < len(cases) else None
    return f' ("{case["name"]}")' if isinstance(case, dict) and case.get("name") else ""


def check(assertion: Assertion, reply: str) -> tuple[bool | None, str]:
    """(passed, why) of one assertion on one reply; passed is None when it was not run."""
    answer = final_answer(reply)
    fold = (lambda s: s.casefold()) if assertion.ignore_case else (lambda s: s)
    match assertion.kind:
        case "equals":
            ok = fold(answer) == fold(assertion.equals.strip())
            return ok, "" if ok else f"expected {assertion.equals!r}, got {answer!r}"
        case "contains":
            ok = fold(assertion.contains) in fold(answer)
            return ok, "" if ok else f"{assertion.contains!r} not in {answer!r}"
        case "regex":
            ok = re.search(assertion.regex, answer) is not None
            return ok, "" if ok else f"/{assertion.regex}/ does not match {answer!r}"
        case "json_schema":
            parsed, value = parse_json(reply)
            if not parsed:
                return False, f"not JSON: {answer[:80]!r}"
            errors = schema_errors(value, assertion.json_schema)
            return not errors, "; ".join(errors[:3])
        case "numeric":
            return check_number(assertion.numeric, assertion.tolerance, answer)
    return None, NO_JUDGE


def check_number(expected: float, tolerance: float, answer: str) -> tuple[bool, str]:
    """Whether the first number in the answer is within `tolerance` of `expected`."""
    found = _NUMBER.search(answer.replace(",", ""))
    if not found:
        return False, f"no number in {answer!r}"
    value = float(found.group())
    ok = math.isclose(value, expected, abs_tol=tolerance) or abs(value - expected) <= tolerance
    return ok, "" if ok else f"{value:g} is not within {tolerance:g} of {expected:g}"


def run_checks(
    name: str, suite: Suite, replies: list[str], judge: RubricJudge | None = None
) -> list[dict[str, Any]]:
    """One result row per (case, assertion): suite, case, kind, passed (None: not run), reason, reply.
    `judge` decides the rubric assertions, all in one batch; without one they are not run."""
    rows, rubrics = [], []
    conversations = suite.conversations()
    for index, (case, reply) in enumerate(zip(suite.cases, replies, strict=True)):
        for assertion in case.assertions:
            passed, reason = check(assertion, reply)
            if assertion.kind == "rubric" and judge is not None:
                rubrics.append((len(rows), (assertion.rubric, conversations[index], reply)))
            rows.append(
                {
                    "suite": name,
                    "case": case.name or f"case {index + 1}",
                    "kind": assertion.kind,
                    "passed": passed,
                    "reason": reason,
                    "reply": reply,
                }
            )
    if rubrics:
        verdicts = judge([item for _, item in rubrics])
        for (row_index, _), (passed, reason) in zip(rubrics, verdicts, strict=True):
            rows[row_index] |= {"passed": passed, "reason": reason}
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pass rates per assertion kind and overall (passed / run), and what was not run and why."""
    by_kind: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_kind.setdefault(row["kind"], {"passed": 0, "failed": 0, "not_run": 0})
        entry["passed" if row["passed"] else "not_run" if row["passed"] is None else "failed"] += 1
        if row["passed"] is None:
            entry.setdefault("reason", row["reason"])  # the first not-run assertion's reason
    for entry in by_kind.values():
        run = entry["passed"] + entry["failed"]
        entry["pass_rate"] = entry["passed"] / run if run else None
    passed = sum(e["passed"] for e in by_kind.values())
    run = passed + sum(e["failed"] for e in by_kind.values())
    return {"pass_rate": passed / run if run else None, "passed": passed, "run": run, "by_kind": by_kind}
