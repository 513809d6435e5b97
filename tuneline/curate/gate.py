"""The quality gate: the cleaned records must pass a Great Expectations suite before training.

The suite is a reviewable file in `expectations/` (`gate.suite`); its thresholds are GE suite
parameters (`{"$PARAMETER": "min_chars"}`) filled from the recipe's `gate` section when the
suite runs, so the file never repeats numbers the recipe owns. Each record becomes one compact
row (`conversation_row` or `document_row`, as the suite's `meta.rows` says): lengths, counts,
role, language, a short excerpt of the weakest turn (a tool call counts as text), never the whole
text, so 1M records fit in a few hundred MB; rows are built while the records stream by and the
records themselves are copied through as a file, never held in memory. On success the records
pass through unchanged, with GE's validation result (`validation.json`) and Data Docs
(`data_docs/index.html`) beside them; on failure `GateFailed` lists every failed expectation
with sample ids, and no stage is left.

The gate judges the dataset, not single records: a row-level check passes when a share
`gate.mostly` of the rows pass it (shares, rates and counts otherwise). Dropping one bad record,
with its reason, is the clean stage's job; the gate stops data that is bad in bulk.

Great Expectations costs seconds and ~200 MB to import, so it is imported inside `validate_frame`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tuneline.curate.docs import make_offline
from tuneline.errors import UserError
from tuneline.pipeline import GATE
from tuneline.recipe import GateSpec
from tuneline.records import Record, record_text
from tuneline.store import (
    RECORDS,
    StageRef,
    StageWriter,
    files_digest,
    iter_records,
    reuse_or_write,
    stage_key,
)

EXPECTATIONS_DIR = Path(__file__).resolve().parents[2] / "expectations"
EXCERPT_CHARS = 60
ROW_TEXT_CHARS = 80  # the weakest turn kept in a row: enough to see it is blank or what it says
# The row-level result keys kept in stats: enough to read why an expectation passed or failed.
SUMMARY_KEYS = ("observed_value", "element_count", "unexpected_count", "unexpected_percent")


class GateFailed(UserError, RuntimeError):
    """The records failed the quality suite; the message lists each failed expectation."""

    def __init__(self, suite: str, failures: list[str]) -> None:
        self.suite = suite
        self.failures = failures
        super().__init__(
            f"quality gate: {len(failures)} expectation(s) of suite {suite!r} failed; fix the data "
            f"or the thresholds in the recipe's `gate` section:\n" + "\n".join(f"  - {f}" for f in failures)
        )


class SuiteError(UserError, ValueError):
    """The suite named by `gate.suite` is missing from expectations/ or cannot be loaded."""


def suite_path(suite: str) -> Path:
    """The suite file named by `gate.suite`; raises SuiteError naming the field."""
    path = EXPECTATIONS_DIR / f"{suite}.json"
    if not path.is_file():
        known = sorted(p.stem for p in EXPECTATIONS_DIR.glob("*.json"))
        raise SuiteError(f"gate.suite: {suite!r} has no file {path}; choose one of {known}")
    return path


def suite_parameters(spec: GateSpec) -> dict[str, Any]:
    """The recipe's thresholds under the names the suite's `$PARAMETER` references use."""
    return {
        "min_records": spec.min_records,
        "min_chars": spec.min_chars,
        "max_chars": spec.max_chars,
        "max_tokens": spec.max_tokens,
        "min_unique_share": 1 - spec.max_duplicate_rate,
        "languages": spec.languages,
        "min_language_share": spec.min_language_share,
        "max_label_share": spec.max_label_share,
        "mostly": spec.mostly,
    }


def turn_text(message: dict[str, Any]) -> str:
    """What a turn says, stripped: its text, then one `name(arguments)` line per tool call. A call
    is content: an assistant turn that only calls a tool is not an empty answer."""
    calls = message.get("tool_calls") or []
    parts = [message["content"].strip(), *(f"{c.get('name')}({c.get('arguments') or ''})" for c in calls)]
    return "\n".join(part for part in parts if part)


def _meta_columns(record: Record) -> dict[str, Any]:
    """What the clean stage measured (tokens, language) and the final answer, the label if any."""
    meta = record.get("meta") or {}
    answers = [turn_text(m) for m in record["messages"] if m["role"] == "assistant"]
    return {
        "tokens": meta.get("tokens"),
        "language": meta.get("language", "und"),
        "answer": answers[-1][:ROW_TEXT_CHARS] if answers else "",
    }


def conversation_row(record: Record) -> dict[str, Any]:
    """One record as a compact row. Per role, the *weakest* turn stands for the record: the
    emptiest turn's text (stripped, first 80 characters; tool calls count as text) and the
    shortest turn's length, so one blank turn anywhere marks the row."""
    messages = record["messages"]
    user = sorted((turn_text(m) for m in messages if m["role"] == "user"), key=len)
    assistant = sorted((turn_text(m) for m in messages if m["role"] == "assistant"), key=len)
    return {
        "id": record["id"],
        "n_turns": len(messages),
        "last_role": messages[-1]["role"] if messages else "",
        "user_text": user[0][:ROW_TEXT_CHARS] if user else "",
        "assistant_text": assistant[0][:ROW_TEXT_CHARS] if assistant else "",
        "user_chars": len(user[0]) if user else 0,
        "assistant_chars": len(assistant[0]) if assistant else 0,
        "longest_turn_chars": max(map(len, user + assistant), default=0),
        **_meta_columns(record),
    }


def document_row(record: Record) -> dict[str, Any]:
    """One record as a document row: its whole text's length and first 80 characters."""
    text = record_text(record).strip()
    return {
        "id": record["id"],
        "text": text[:ROW_TEXT_CHARS],
        "chars": len(text),
        **_meta_columns(record),
    }


ROW_BUILDERS: dict[str, Callable[[Record], dict[str, Any]]] = {
    "conversation": conversation_row,
    "document": document_row,
}


def rows_frame(records: Iterable[Record], row: Callable[[Record], dict[str, Any]] = conversation_row) -> Any:
    """The table the suite validates, one row per record in order, built column by column while
    the records stream by. `answer_share` is the share of records whose final answer equals this
    one's: its maximum is the label balance."""
    import pandas as pd

    columns: dict[str, list[Any]] = {name: [] for name in row({"id": "", "messages": []})}
    for record in records:
        for name, value in row(record).items():
            columns[name].append(value)
    frame = pd.DataFrame(columns)
    frame["tokens"] = frame["tokens"].astype("Int64")
    answers = frame.pop("answer")
    frame["answer_share"] = (
        answers.map(answers.value_counts(normalize=True)).astype(float)
        if len(frame)
        else pd.Series(dtype=float)
    )
    return frame


def records_frame(records: list[Record]) -> Any:
    """The conversation table of a list of records (tests, small files)."""
    return rows_frame(records)


def suite_rows(suite_file: Path) -> Callable[[Record], dict[str, Any]]:
    """The row builder a suite validates: its `meta.rows` (conversation or document)."""
    kind = json.loads(suite_file.read_text(encoding="utf-8")).get("meta", {}).get("rows", "conversation")
    if kind not in ROW_BUILDERS:
        raise SuiteError(f"{suite_file}: meta.rows {kind!r} is not one of {sorted(ROW_BUILDERS)}")
    return ROW_BUILDERS[kind]


def validate_frame(frame: Any, suite_file: Path, spec: GateSpec, docs_dir: Path | None) -> dict[str, Any]:
    """Run the suite over the frame in an ephemeral GE context; returns GE's validation result
    as JSON. With `docs_dir`, Data Docs for the result are built there (~0.5 s)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # read when GE is imported
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In memory, without the default Data Docs site (a temp folder): ours goes into the stage.
    stores = InMemoryStoreBackendDefaults(init_temp_docs_sites=False)
    context = gx.get_context(
        mode="ephemeral", project_config=DataContextConfig(store_backend_defaults=stores)
    )
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("tuneline").add_dataframe_asset("records")
    suite = context.suites.add(load_suite(suite_file))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name=suite.name, data=batch.add_batch_definition_whole_dataframe("all"), suite=suite
        )
    )
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": ["id"],  # failing rows reported by record id
        "partial_unexpected_count": max(spec.examples, 1),
    }
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site("stage", _docs_site_config(docs_dir))
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite.name, validation_definitions=[definition], actions=actions, result_format=result_format
        )
    )
    parameters = suite_parameters(spec)
    if not parameters["languages"]:  # no languages named: the language check accepts what is there
        parameters["languages"] = sorted(set(frame["language"])) if "language" in frame else []
    run = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
    (result,) = run.run_results.values()
    return result.to_json_dict()


def load_suite(suite_file: Path) -> Any:
    """The suite file as a GE ExpectationSuite. An expectation type GE does not know (a typo, a
    custom class not imported) raises here; read through a context's store it would be dropped
    with only a log line, so the loaded count is checked too. Both are errors naming the file."""
    import great_expectations as gx
    from great_expectations.exceptions import InvalidExpectationConfigurationError

    data = json.loads(suite_file.read_text(encoding="utf-8"))
    try:
        suite = gx.ExpectationSuite(**data)
    except InvalidExpectationConfigurationError as error:
        raise SuiteError(
            f"{suite_file}: {error}; check the type's spelling, or import a custom expectation's class first"
        ) from None
    if len(suite.expectations) != len(data.get("expectations", [])):
        loaded = {e.expectation_type for e in suite.expectations}
        missing = sorted({e["type"] for e in data["expectations"]} - loaded)
        raise SuiteError(
            f"{suite_file}: {len(data['expectations'])} expectations in the file but "
            f"{len(suite.expectations)} loaded; unknown types {missing}: "
            "import their classes before the gate runs"
        )
    return suite


def _docs_site_config(docs_dir: Path) -> dict[str, Any]:
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


def summarize_results(validation: dict[str, Any]) -> list[dict[str, Any]]:
    """One short row per expectation: type, column, success, thresholds and what was observed."""
    rows = []
    for result in validation["results"]:
        config = result["expectation_config"]
        kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id", "column")}
        observed = {k: result["result"][k] for k in SUMMARY_KEYS if k in result["result"]}
        row = {"type": config["type"], "column": config["kwargs"].get("column"), "success": result["success"]}
        row.update(thresholds=kwargs, **observed)
        if error := exception_message(result.get("exception_info")):
            row["error"] = error
        row["failing_ids"] = [i["id"] for i in result["result"].get("partial_unexpected_index_list") or []]
        rows.append(row)
    return rows


def exception_message(info: dict[str, Any] | None) -> str | None:
    """The error of an expectation that could not run (e.g. a column the table lacks). GE gives
    either one {raised_exception, exception_message} or one such dict per failed metric."""
    if not info:
        return None
    parts = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(p.get("exception_message")) for p in parts if p.get("raised_exception")]
    return "; ".join(dict.fromkeys(messages)) or None


def describe_failure(row: dict[str, Any], texts: dict[str, str], examples: int) -> str:
    """A failed expectation as one readable line: what, observed, allowed, and sample records."""
    where = f" on {row['column']}" if row["column"] else ""
    if row.get("error"):
        return f"{row['type']}{where}: could not run: {row['error']}"
    if "unexpected_percent" in row:
        observed = (
            f"{row['unexpected_count']} of {row['element_count']} rows unexpected "
            f"({row['unexpected_percent']:.2f}%)"
        )
    else:
        observed = f"observed {row.get('observed_value')!r}"
    thresholds = {"mostly": 1.0, **row["thresholds"]} if "unexpected_percent" in row else row["thresholds"]
    allowed = ", ".join(f"{k}={v!r}" for k, v in thresholds.items())
    line = f"{row['type']}{where}: {observed}; expected {allowed}"
    samples = list(dict.fromkeys(row["failing_ids"]))[:examples]
    if samples:
        line += "; e.g. " + "; ".join(f"{i} {_excerpt(texts.get(i, ''))}" for i in samples)
    return line


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return json.dumps(
        flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 3] + "...", ensure_ascii=False
    )


def sample_texts(records: Iterable[Record], ids: set[str]) -> dict[str, str]:
    """The text of the few failing records a message shows, found in one more pass."""
    return {r["id"]: record_text(r) for r in records if r["id"] in ids}


def check_records(
    records: Callable[[], Iterable[Record]], spec: GateSpec, docs_dir: Path | None
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Validate records (a callable giving a fresh stream: failing samples need a second pass)
    with the recipe's suite. Returns GE's result, the summary rows and the record count, or raises
    GateFailed with each failed expectation and sample records."""
    suite_file = suite_path(spec.suite)
    frame = rows_frame(records(), suite_rows(suite_file))
    validation = validate_frame(frame, suite_file, spec, docs_dir)
    summary = summarize_results(validation)
    if not validation["success"]:
        failing = [row for row in summary if not row["success"]]
        wanted = {i for row in failing for i in row["failing_ids"][: spec.examples]}
        texts = sample_texts(records(), wanted) if wanted else {}
        raise GateFailed(spec.suite, [describe_failure(row, texts, spec.examples) for row in failing])
    return validation, summary, len(frame)


def run_gate(artifacts_dir: str | Path, cleaned: StageRef, spec: GateSpec) -> StageRef:
    """Validate the cleaned records with the recipe's suite and pass them through, or raise
    GateFailed (before any training) listing each failed expectation with sample ids."""
    suite_file = suite_path(spec.suite)
    digest = stage_key(GATE, spec, cleaned.digest, files_digest(suite_file))

    def write(writer: StageWriter) -> None:
        started = time.perf_counter()
        validation, summary, count = check_records(
            lambda: iter_records(cleaned, RECORDS), spec, writer.path("data_docs")
        )
        seconds = time.perf_counter() - started
        for gif in writer.path("data_docs").rglob("*.gif"):
            gif.unlink()  # GE's how-to animations (3.3 MB), never referenced by the pages
        make_offline(writer.path("data_docs"))
        writer.path("validation.json").write_text(json.dumps(validation, indent=2), encoding="utf-8")
        # The records pass through unchanged: a file copy, not a parse and re-dump of each line.
        if cleaned.file(RECORDS).exists():
            shutil.copyfile(cleaned.file(RECORDS), writer.path(RECORDS))
        writer.count_in(count)
        writer.records_out += count
        writer.stats = {
            "suite": spec.suite,
            "records": count,
            "parameters": suite_parameters(spec),
            "expectations": summary,
            "seconds": round(seconds, 2),
            "data_docs": "data_docs/index.html",
        }

    return reuse_or_write(artifacts_dir, GATE, digest, write, [cleaned])
