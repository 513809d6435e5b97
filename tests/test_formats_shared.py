"""Formats on the real data in ../shared/data: LLaMA-Factory demos and self-instruct seed tasks.

Every file reads with zero rejects in the format dataset_info.json names (and detection agrees),
and alpaca and sharegpt files come back unchanged through canonical records.
"""

import json
from pathlib import Path

import pytest

from tuneline.formats import detect_format, read_records, to_format, write_records

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not (SHARED / "data").is_dir():
    pytest.skip(f"{SHARED / 'data'} not found: the shared data sets are absent", allow_module_level=True)

LLAMAFACTORY = SHARED / "data" / "llamafactory"
SEED_TASKS = SHARED / "data" / "self_instruct" / "seed_tasks.jsonl"
EXPECTED_RECORDS = {"alpaca_en_demo": 999, "identity": 91, "glaive_toolcall_en_demo": 300}


def dataset_format(name: str) -> str:
    """The format LLaMA-Factory's dataset_info.json gives a dataset (alpaca when it names none)."""
    info = json.loads((LLAMAFACTORY / "dataset_info.json").read_text())[name]
    return info.get("formatting", "alpaca")


@pytest.mark.parametrize("name", sorted(EXPECTED_RECORDS))
def test_llamafactory_files_read_without_rejects_and_detection_agrees(name):
    path = LLAMAFACTORY / f"{name}.json"
    fmt = dataset_format(name)
    assert detect_format(path) == fmt
    result = read_records(path, fmt)
    assert result.rejects == []
    assert len(result.records) == EXPECTED_RECORDS[name]
    # Each element of these indent-2 arrays starts on a line that is exactly "  {".
    lines = path.read_text(encoding="utf-8").splitlines()
    assert {lines[record["meta"]["line"] - 1] for record in result.records} == {"  {"}


def test_glaive_tool_calls_are_canonical():
    result = read_records(LLAMAFACTORY / "glaive_toolcall_en_demo.json")
    calls = [m for record in result.records for m in record["messages"] if m.get("tool_calls")]
    assert len(calls) == 211
    assert all(json.loads(call["arguments"]) is not None for m in calls for call in m["tool_calls"])
    assert all(record["tools"] for record in result.records)


def test_self_instruct_seed_tasks_give_one_record_per_task():
    assert detect_format(SEED_TASKS) == "self_instruct"
    result = read_records(SEED_TASKS)
    assert result.rejects == []
    assert len(result.records) == 175


@pytest.mark.parametrize("name", sorted(EXPECTED_RECORDS))
def test_round_trip_through_canonical_records_is_lossless(tmp_path, name):
    path = LLAMAFACTORY / f"{name}.json"
    fmt = dataset_format(name)
    rows = json.loads(path.read_text(encoding="utf-8"))
    records = read_records(path, fmt).records
    converted = [to_format(record, fmt) for record in records]
    assert [losses for _, losses in converted] == [[]] * len(rows)
    assert [obj for obj, _ in converted] == rows
    result = write_records(records, tmp_path / path.name, fmt)
    assert (result.written, result.losses, result.unconverted) == (len(rows), {}, [])
    assert json.loads((tmp_path / path.name).read_text(encoding="utf-8")) == rows
    again = read_records(tmp_path / path.name, fmt).records
    assert [record["id"] for record in again] == [record["id"] for record in records]


@pytest.mark.parametrize("name", ["c4_demo.jsonl", "wiki_demo.txt"])
def test_llamafactory_pretraining_text_reads_as_documents(name):
    path = LLAMAFACTORY / name
    if not path.is_file():
        pytest.skip(f"{path} not found: LLaMA-Factory's pre-training demo is not in the shared data")
    assert detect_format(path) == "text"
    result = read_records(path)
    assert result.rejects == [] and result.records == []
    assert result.documents and all(document["text"].strip() for document in result.documents)
