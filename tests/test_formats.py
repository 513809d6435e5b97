"""Formats: each reader and writer, detection, malformed files (reason and line), round trips, CLI."""

import gzip
import json

import fsspec
import pytest
from typer.testing import CliRunner

from tuneline import formats
from tuneline.cli.data import data_app
from tuneline.formats import (
    ConversionError,
    Format,
    FormatError,
    detect_format,
    iter_file,
    read_records,
    to_format,
    write_records,
)
from tuneline.records import make_record

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}]
SHAREGPT_TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "system": "Be brief.",
    "tools": json.dumps(TOOLS),
}
ALPACA_ROW = {
    "instruction": "Translate.\n\nKeep the tone.",
    "input": "Bonjour",
    "output": "Hello",
    "system": "You translate.",
    "history": [["Hi", "Hello! What shall I translate?"]],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_one(path, format=None):
    result = read_records(path, format)
    assert result.rejects == []
    assert len(result.records) == 1
    return result.records[0]


# --- readers ---------------------------------------------------------------------------------


def test_alpaca_reader_builds_system_history_and_joined_input(tmp_path):
    record = read_one(write_jsonl(tmp_path / "a.jsonl", [ALPACA_ROW]))
    assert record["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! What shall I translate?"},
        {"role": "user", "content": "Translate.\n\nKeep the tone.\n\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert record["tools"] is None
    path = str(tmp_path / "a.jsonl")
    assert record["meta"] == {"source": "a", "origin": "collected", "file": path, "line": 1, "input_chars": 7}


def test_alpaca_without_input_is_the_instruction_alone(tmp_path):
    record = read_one(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "input": "", "output": "yo"}]))
    assert record["messages"][0] == {"role": "user", "content": "hi"}
    assert "input_chars" not in record["meta"]


def test_sharegpt_reader_maps_function_call_observation_system_and_tools(tmp_path):
    record = read_one(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT_TOOL_ROW]))
    assert record["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    assert record["tools"] == json.dumps(TOOLS)


def test_sharegpt_tools_as_list_become_json_text_and_several_calls_are_allowed(tmp_path):
    row = {
        "conversations": [
            {"from": "user", "value": "Paris and Rome?"},
            {
                "from": "function_call",
                "value": json.dumps([CALL, {"name": "get_weather", "arguments": "{}"}]),
            },
            {"from": "observation", "value": "sunny"},
            {"from": "assistant", "value": "Sunny."},
        ],
        "tools": TOOLS,
    }
    record = read_one(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert json.loads(record["tools"]) == TOOLS
    assert [call["arguments"] for call in record["messages"][1]["tool_calls"]] == ['{"city": "Paris"}', "{}"]


def test_sharegpt_accepts_messages_with_role_and_content(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": ""}
    record = read_one(write_jsonl(tmp_path / "s.jsonl", [row]), "sharegpt")
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["tools"] is None


def test_openai_reader_maps_tool_calls_tool_turns_parts_and_tools(tmp_path):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "now?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [{"type": "function", "function": TOOLS[0]}],
    }
    record = read_one(write_jsonl(tmp_path / "o.jsonl", [row]))
    assert record["messages"][0]["content"] == "Weather now?"
    assert record["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "get_weather", "arguments": "{}"}],
    }
    assert record["messages"][2] == {"role": "tool", "content": "sunny"}
    assert json.loads(record["tools"])[0]["function"]["name"] == "get_weather"


def test_openai_json_array_file_reports_the_line_each_element_starts_on(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(3)
    ]
    path = tmp_path / "o.json"
    path.write_text(json.dumps(rows, indent=2))
    result = read_records(path)
    assert result.format == "openai"
    starts = [number for number, text in enumerate(path.read_text().splitlines(), 1) if text == "  {"]
    assert [r["meta"]["line"] for r in result.records] == starts
    assert len(starts) == 3


def test_prompt_completion_reader(tmp_path):
    record = read_one(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": " 4"}]))
    assert record["messages"] == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": " 4"}]


def test_self_instruct_reader_makes_one_record_per_instance_on_the_task_line(tmp_path):
    task = {
        "id": "t1",
        "instruction": "Add.",
        "instances": [{"input": "1 1", "output": "2"}, {"input": "", "output": "0"}],
    }
    result = read_records(write_jsonl(tmp_path / "seed.jsonl", [task]), source="seeds")
    assert [r["messages"][0]["content"] for r in result.records] == ["Add.\n\n1 1", "Add."]
    assert {r["meta"]["line"] for r in result.records} == {1}
    assert {r["meta"]["source"] for r in result.records} == {"seeds"}


def test_bom_blank_lines_and_crlf_are_not_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\n  \r\n{"prompt": "a", "completion": "b"}\r\n\n')
    result = read_records(path)
    assert result.rejects == [] and [r["meta"]["line"] for r in result.records] == [3]


def test_empty_file_reads_as_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    result = read_records(path)
    assert (result.format, result.records, result.rejects) == (None, [], [])
    with pytest.raises(FormatError, match="holds no readable JSON object"):
        detect_format(path)


def test_gzip_and_fsspec_urls_are_read(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n'))
    assert read_one(path)["meta"]["source"] == "p"
    with fsspec.open("memory://tuneline-test/p.json", "wb") as handle:
        handle.write(b'[{"prompt": "a", "completion": "b"}]')
    assert read_one("memory://tuneline-test/p.json")["meta"]["file"] == "memory://tuneline-test/p.json"


def test_a_ten_megabyte_line_is_read(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "x" * 10_000_000, "completion": "y"}])
    assert len(read_one(path)["messages"][0]["content"]) == 10_000_000


def test_a_line_over_the_limit_is_rejected_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 100)
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "x" * 500, "completion": "y"}, {"prompt": "a", "completion": "b"}]
    )
    result = read_records(path, "prompt_completion")
    assert result.rejects == [f"{path}:1: line longer than 100 bytes; not read"]
    assert [r["meta"]["line"] for r in result.records] == [2]


def test_a_truncated_gzip_file_becomes_a_reject_not_a_crash(tmp_path):
    data = gzip.compress(b"".join(b'{"prompt": "a", "completion": "%d"}\n' % i for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    result = read_records(path, "prompt_completion")
    assert result.records
    assert "file unreadable from here on" in result.rejects[-1]


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, Format.ALPACA),
        ({"conversations": []}, Format.SHAREGPT),
        ({"messages": [{"from": "human", "value": "q"}]}, Format.SHAREGPT),
        ({"messages": [{"role": "user", "content": "q"}]}, Format.OPENAI),
        ({"prompt": "p", "completion": "c"}, Format.PROMPT_COMPLETION),
        ({"instruction": "i", "instances": []}, Format.SELF_INSTRUCT),
    ],
)
def test_detect_format_from_the_first_object(tmp_path, row, expected):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "not json\n" + json.dumps(row) + "\n")
    assert detect_format(path) == expected


def test_unknown_keys_raise_a_format_error_naming_file_keys_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FormatError) as error:
        list(iter_file(path))
    message = str(error.value)
    assert message.startswith(f"{path}:1: cannot tell the format from the keys [answer, question]")
    assert "--format alpaca|sharegpt|openai|prompt_completion|self_instruct" in message


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "ignored", "output": "no", "prompt": "p", "completion": "c"}]
    )
    assert detect_format(path) == Format.ALPACA
    record = read_one(path, "prompt_completion")
    assert record["messages"][0]["content"] == "p"
    assert read_records(path, "sharegpt").rejects == [
        f"{path}:1: messages: expected an array of turns, got null"
    ]
    with pytest.raises(FormatError, match="unknown format 'csv'"):
        read_records(path, "csv")


# --- malformed inputs: each is one reject with its line and reason ----------------------------

OK = b'{"prompt": "a", "completion": "b"}\n'
MALFORMED = [
    ("bad-utf8", "x.jsonl", OK + b'{"prompt": "\xff", "completion": "b"}\n', None, 2,
     "invalid UTF-8 at byte 12 of the line (0xff)"),
    ("truncated-last-line", "x.jsonl", OK + b'{"prompt": "a", "compl', None, 2,
     "invalid JSON: Unterminated string starting at (column 17); "
     "the last line has no newline, so the file looks truncated"),
    ("bad-json-mid-file", "x.jsonl", OK + b'{"prompt": }\n' + OK, None, 2,
     "invalid JSON: Expecting value (column 12)"),
    ("two-values-on-a-line", "x.jsonl", OK + b"{} {}\n", None, 2, "invalid JSON: Extra data (column 4)"),
    ("not-an-object", "x.jsonl", OK + b'"just text"\n', None, 2, "expected a JSON object, got string"),
    ("number-not-object", "x.jsonl", b"\n42\n" + OK, None, 2, "expected a JSON object, got number"),
    ("instruction-is-a-number", "x.jsonl", b'{"instruction": 7, "output": "o"}\n', "alpaca", 1,
     "instruction: expected text, got number"),
    ("output-missing", "x.jsonl", b'{"instruction": "i", "input": ""}\n', None, 1, "output: missing"),
    ("history-not-pairs", "x.jsonl", b'{"instruction": "i", "output": "o", "history": [["q"]]}\n', None, 1,
     "history[0]: expected a [question, answer] pair of texts, got ['q']"),
    ("function-call-not-json", "x.jsonl",
     b'{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get(1)"}]}\n',
     None, 1, "conversations[1].value: function_call is not JSON (Expecting value, column 1): 'get(1)'"),
    ("unknown-sharegpt-tag", "x.jsonl", b'{"conversations": [{"from": "bot", "value": "q"}]}\n', None, 1,
     "conversations[0].from: 'bot' is not one of "
     "human, user, gpt, assistant, system, observation, function_call"),
    ("no-assistant-turn", "x.jsonl", b'{"conversations": [{"from": "human", "value": "q"}]}\n', None, 1,
     "messages: no assistant turn to learn from"),
    ("empty-conversation", "x.jsonl", b'{"conversations": []}\n', None, 1, "messages: no conversation turns"),
    ("openai-unknown-role", "x.jsonl",
     b'{"messages": [{"role": "developer", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     None, 1, "messages[0].role: 'developer' is not one of system, user, assistant, tool"),
    ("openai-image-part", "x.jsonl",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}\n', None, 1,
     "messages[0].content[0]: only text parts are supported, got 'image_url'"),
    ("tool-arguments-not-object", "x.jsonl",
     b'{"messages": [{"role": "assistant", "content": null, "tool_calls": '
     b'[{"type": "function", "function": {"name": "f", "arguments": "oops"}}]}]}\n', None, 1,
     "messages[0].tool_calls[0].arguments: expected a JSON object, got text 'oops'"),
    ("tools-wrong-type", "x.jsonl",
     b'{"conversations": [{"from": "gpt", "value": "a"}], "tools": 3}\n', None, 1,
     "tools: expected JSON text or an array of tool schemas, got number"),
    ("lone-surrogate", "x.jsonl", b'{"prompt": "a\\ud800", "completion": "b"}\n', None, 1,
     "text holds a lone surrogate '\\ud800', which is not valid Unicode"),
    ("self-instruct-no-instances", "x.jsonl", b'{"instruction": "i", "instances": []}\n', None, 1,
     "instances: expected a non-empty array of {input, output}, got []"),
    ("array-broken-element", "x.json",
     b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": ,\n  {}\n]\n', None, 3,
     "invalid JSON at line 3 (array element 1): unallowed token at this point in JSON text; "
     "the rest of the array cannot be read"),
    ("array-bad-utf8", "x.json",
     b'[\n {"prompt": "a",\n  "completion": "\xfe"},\n' + OK + b"]", "prompt_completion", 2,
     "invalid UTF-8 at byte 17 of line 3 (0xfe) (array element 0)"),
    ("array-not-closed", "x.json", b'[{"prompt": "a", "completion": "b"},\n' + OK, None, 2,
     "the JSON array is not closed with `]`; the file looks truncated"),
    ("array-trailing-data", "x.json", b'[{"prompt": "a", "completion": "b"}]\n\n{}', None, 3,
     "extra data after the closing `]` of the array"),
    ("deeply-nested", "x.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + OK, None, 1,
     "invalid JSON: nested too deeply to read"),
    ("array-deeply-nested", "x.json", b"[" + OK + b"," + b"[" * 100_000 + b"]" * 100_000 + b"]", None, 2,
     "invalid JSON: nested too deeply to read (array element 1)"),
    ("array-missing-comma", "x.json", b'[{"prompt": "a", "completion": "b"}\n {}]', None, 2,
     "invalid JSON at line 2 (array element 1): after array element, I expect ',' or ']'; "
     "the rest of the array cannot be read"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "file_name", "data", "fmt", "line", "reason"), MALFORMED, ids=[c[0] for c in MALFORMED]
)
def test_malformed_input_is_one_reject_with_line_and_reason(
    tmp_path, name, file_name, data, fmt, line, reason
):
    path = tmp_path / file_name
    path.write_bytes(data)
    result = read_records(path, fmt)
    assert result.rejects == [f"{path}:{line}: {reason}"]


# --- writers ---------------------------------------------------------------------------------


def record_of(messages, tools=None, meta=None):
    return make_record(messages, tools, meta or {"file": "in.jsonl", "line": 7})


def user_assistant(question="q", answer="a"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


TOOL_MESSAGES = [
    {"role": "user", "content": "Weather?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


def test_each_writer_on_a_plain_record():
    record = record_of([{"role": "system", "content": "s"}, *user_assistant()])
    assert to_format(record, "alpaca") == (
        {"instruction": "q", "input": "", "output": "a", "system": "s"},
        [],
    )
    assert to_format(record, "sharegpt") == (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
        [],
    )
    assert to_format(record, "openai") == ({"messages": record["messages"]}, [])
    assert to_format(record, "prompt_completion") == (
        {"prompt": "q", "completion": "a"},
        ["system: prompt_completion has no place for a system prompt; dropped"],
    )


def test_openai_writer_wraps_tools_and_pairs_call_ids():
    obj, losses = to_format(record_of(TOOL_MESSAGES, json.dumps(TOOLS)), "openai")
    assert losses == []
    assert obj["messages"][1]["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert obj["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}
    assert obj["tools"] == [{"type": "function", "function": TOOLS[0]}]


def test_sharegpt_writer_unwraps_openai_tools_and_reports_dropped_text():
    messages = [*TOOL_MESSAGES]
    messages[1] = {**messages[1], "content": "Let me look."}
    wrapped = json.dumps([{"type": "function", "function": TOOLS[0]}])
    obj, losses = to_format(record_of(messages, wrapped), "sharegpt")
    assert obj["conversations"][1] == {"from": "function_call", "value": json.dumps(CALL)}
    assert json.loads(obj["tools"]) == TOOLS
    assert losses == ["sharegpt function_call turns hold no text; assistant text beside a call dropped"]


@pytest.mark.parametrize(
    ("target", "messages", "tools", "reason"),
    [
        ("alpaca", TOOL_MESSAGES, None, "alpaca cannot hold tool calls or tool results"),
        ("alpaca", [*user_assistant(), {"role": "system", "content": "s"}, *user_assistant()], None,
         "alpaca holds one system prompt, at the start; this record has another"),
        ("alpaca", [{"role": "assistant", "content": "a"}, *user_assistant()], None,
         "alpaca needs user/assistant turns that alternate, starting with user"),
        ("prompt_completion", user_assistant() * 2, None,
         "prompt_completion holds one user turn and one answer; this record has 4 turns"),
        ("sharegpt", [*user_assistant(), {"role": "system", "content": "s"}], None,
         "sharegpt holds one system prompt, at the start; this record has another"),
    ],
)  # fmt: skip
def test_records_a_target_cannot_hold_are_not_converted_with_the_reason(target, messages, tools, reason):
    with pytest.raises(ConversionError, match="^" + reason.replace("(", r"\(") + "$"):
        to_format(record_of(messages, tools), target)


def test_losses_are_reported_not_silent():
    _, losses = to_format(
        record_of([*user_assistant(), {"role": "user", "content": "more?"}], "[]x"), "alpaca"
    )
    assert losses == [
        "tools: alpaca cannot hold tool schemas; dropped",
        "alpaca ends on the answer; turns after the last assistant turn dropped",
    ]
    _, losses = to_format(record_of(user_assistant(), "not json"), "openai")
    assert losses == ["tools: not JSON text; dropped"]


def test_write_records_counts_losses_and_names_unconverted_records(tmp_path):
    records = [
        record_of(user_assistant(), json.dumps(TOOLS)),
        record_of(TOOL_MESSAGES),
        record_of(user_assistant()),
    ]
    result = write_records(records, tmp_path / "out.jsonl", "alpaca")
    assert result.written == 2
    assert result.losses == {"tools: alpaca cannot hold tool schemas; dropped": 1}
    assert result.unconverted == [("in.jsonl:7", "alpaca cannot hold tool calls or tool results")]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    with pytest.raises(FormatError, match="cannot write 'self_instruct'"):
        write_records(records, tmp_path / "x.jsonl", "self_instruct")


def test_json_suffix_writes_an_array_and_gz_compresses(tmp_path):
    records = [record_of(user_assistant("é", str(i))) for i in range(3)]
    write_records(records, tmp_path / "out.json", "sharegpt")
    assert (
        json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))[0]["conversations"][0]["value"] == "é"
    )
    starts = [
        n for n, text in enumerate((tmp_path / "out.json").read_text().splitlines(), 1) if text == "  {"
    ]
    assert [r["meta"]["line"] for r in read_records(tmp_path / "out.json").records] == starts
    write_records(records, tmp_path / "out.jsonl.gz", "openai")
    assert len(gzip.decompress((tmp_path / "out.jsonl.gz").read_bytes()).splitlines()) == 3
    write_records([], tmp_path / "none.json", "alpaca")
    assert json.loads((tmp_path / "none.json").read_text()) == []


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "row"), [("alpaca", ALPACA_ROW), ("sharegpt", SHAREGPT_TOOL_ROW)])
def test_round_trip_is_lossless(tmp_path, fmt, row):
    record = read_one(write_jsonl(tmp_path / "in.jsonl", [row]))
    assert to_format(record, fmt) == (row, [])
    write_records([record], tmp_path / "out.json", fmt)
    assert json.loads((tmp_path / "out.json").read_text()) == [row]


def test_alpaca_split_without_hint_keeps_the_whole_prompt_in_instruction():
    record = record_of([{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}])
    assert to_format(record, "alpaca")[0] == {"instruction": "a\n\nb", "input": "", "output": "c"}


@pytest.mark.parametrize("target", ["sharegpt", "openai"])
def test_tool_conversations_survive_sharegpt_and_openai(tmp_path, target):
    record = record_of(TOOL_MESSAGES, json.dumps(TOOLS))
    write_records([record], tmp_path / "out.jsonl", target)
    again = read_one(tmp_path / "out.jsonl", target)
    assert again["messages"] == record["messages"]
    assert json.loads(again["tools"]) in (TOOLS, [{"type": "function", "function": TOOLS[0]}])


# --- CLI -------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_inspect_good_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA_ROW, {"instruction": "i", "output": "o"}])
    result = runner.invoke(data_app, ["inspect", str(path)])
    assert result.exit_code == 0
    assert result.output.splitlines() == ["format: alpaca", "records: 2", "turns: 7", "unreadable: 0"]


def test_cli_inspect_lists_unreadable_records_and_exits_1(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(OK + b"[]\n" + OK + b'{"prompt": 1}\n')
    result = runner.invoke(data_app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines()[-3:] == [
        "unreadable: 2",
        f"{path}:2: expected a JSON object, got array",
        f"{path}:4: prompt: expected text, got number",
    ]


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b'{"q": 1}\n', [], "cannot tell the format from the keys [q]"),
        (None, [], "no such file or folder; check the path"),
        (OK, ["--format", "csv"], "Invalid value for '--format'"),
    ],
)
def test_cli_inspect_file_errors_exit_2_without_traceback(tmp_path, content, args, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    result = runner.invoke(data_app, ["inspect", str(path), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_convert_writes_the_file_atomically_and_exits_0(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [SHAREGPT_TOOL_ROW])
    out = tmp_path / "out.json"
    result = runner.invoke(data_app, ["convert", str(source), str(out), "--to", "openai"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote 1 records to {out} as openai"]
    assert json.loads(out.read_text())[0]["messages"][2]["role"] == "assistant"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.json"]


def test_cli_convert_reports_losses_unconverted_and_unreadable_then_exits_1(tmp_path):
    plain = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "tools": "[]x",
    }
    source = write_jsonl(tmp_path / "in.jsonl", [SHAREGPT_TOOL_ROW, plain, {"conversations": 5}])
    out = tmp_path / "out.jsonl"
    result = runner.invoke(data_app, ["convert", str(source), str(out), "--to", "alpaca"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"wrote 1 records to {out} as alpaca",
        "lost in converted records:",
        "  1 × tools: alpaca cannot hold tool schemas; dropped",
        "not converted:",
        "  1 × conversations: expected an array of turns, got number",
        "  1 × alpaca cannot hold tool calls or tool results",
        f"{source}:3: conversations: expected an array of turns, got number",
        f"{source}:1: alpaca cannot hold tool calls or tool results",
    ]
    assert len(out.read_text().splitlines()) == 1


def test_cli_convert_refuses_self_instruct_and_leaves_nothing_on_a_format_error(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"q": 1}])
    out = tmp_path / "out.jsonl"
    result = runner.invoke(data_app, ["convert", str(source), str(out), "--to", "self_instruct"])
    assert result.exit_code == 2 and "does not write self_instruct" in result.output
    result = runner.invoke(data_app, ["convert", str(source), str(out), "--to", "alpaca"])
    assert result.exit_code == 2 and "cannot tell the format" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# --- OpenAI per-turn weight, text parts, document sources (issue 14) ---------------------------


WEIGHTED_ROW = {
    "messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Lyon.", "weight": 0},
        {"role": "user", "content": "Wrong, try again."},
        {"role": "assistant", "content": "Paris.", "weight": 1},
    ]
}


def test_openai_weight_is_kept_on_read_and_written_back_to_openai(tmp_path):
    record = read_one(write_jsonl(tmp_path / "w.jsonl", [WEIGHTED_ROW]))
    assert [m.get("weight") for m in record["messages"]] == [None, 0, None, 1]
    obj, losses = to_format(record, "openai")
    assert obj == WEIGHTED_ROW and losses == []


@pytest.mark.parametrize("target", ["alpaca", "sharegpt"])
def test_a_target_without_weights_reports_the_weight_lost(target):
    record = record_of(WEIGHTED_ROW["messages"])
    _, losses = to_format(record, target)
    assert losses == [
        f"weight: {target} cannot hold per-turn weights; turns with weight 0 would be trained on"
    ]
    unweighted = record_of([{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED_ROW["messages"]])
    assert to_format(unweighted, target)[1] == []


def test_cli_convert_counts_lost_weights_and_exits_1(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [WEIGHTED_ROW])
    result = runner.invoke(data_app, ["convert", str(path), str(tmp_path / "out.json"), "--to", "sharegpt"])
    assert result.exit_code == 1
    assert "  1 × weight: sharegpt cannot hold per-turn weights; turns with weight 0 would be trained on" in (
        result.output.splitlines()
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"role": "assistant", "content": "a", "weight": 0.5}, "messages[1].weight: expected 0"),
        ({"role": "user", "content": "a", "weight": 0}, "messages[1].weight: only assistant messages carry"),
    ],
)
def test_a_bad_weight_is_a_reject_naming_the_field(tmp_path, message, reason):
    row = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}
    result = read_records(write_jsonl(tmp_path / "w.jsonl", [row]))
    assert len(result.rejects) == 1 and reason in result.rejects[0]


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        (
            {"type": "text", "value": "hi"},
            'messages[0].content[0]: a text part holds its text in "text"; this one has [type, value]; '
            'rename "value" to "text"',
        ),
        (
            {"type": "image_url", "image_url": {}},
            "messages[0].content[0]: only text parts are supported, got 'image_url'",
        ),
        ({"type": "text", "text": 3}, "messages[0].content[0].text: expected text, got number"),
    ],
)
def test_a_content_part_error_says_what_is_wrong_and_the_fix(tmp_path, part, reason):
    row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "a"}]}
    result = read_records(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert result.rejects == [f"{tmp_path / 'p.jsonl'}:1: {reason}"]


def test_text_json_lines_are_documents_with_rejects_for_empty_text(tmp_path):
    path = write_jsonl(
        tmp_path / "c4.jsonl", [{"text": "First page."}, {"text": " "}, {"text": "Two", "title": "T"}]
    )
    assert detect_format(path) == Format.TEXT
    result = read_records(path)
    assert (result.format, result.records) == (Format.TEXT, [])
    assert [(d["text"], d["title"], d["line"], d["source"]) for d in result.documents] == [
        ("First page.", None, 1, "c4"),
        ("Two", "T", 3, "c4"),
    ]
    assert result.rejects == [f"{path}:2: text: empty, so there is no document"]


def test_a_plain_text_file_is_one_document_and_a_bad_line_is_left_out_with_a_reason(tmp_path):
    path = tmp_path / "notes.md"
    path.write_bytes(b"# Lamps\n\nA lamp gives light.\n\xff\xfe broken\nBulbs wear out.\n")
    result = read_records(path)
    assert result.format == Format.TEXT
    assert [d["text"] for d in result.documents] == ["# Lamps\n\nA lamp gives light.\nBulbs wear out."]
    assert result.documents[0]["title"] == "notes.md"
    assert result.rejects == [f"{path}:4: invalid UTF-8 at byte 0 of the line; line left out"]


def test_a_large_text_file_is_cut_into_documents_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "DOCUMENT_CHARS", 20)
    path = tmp_path / "book.txt"
    path.write_text("one two three four five\n\nsix seven\n\neight\n")
    documents = read_records(path).documents
    assert [(d["text"], d["line"]) for d in documents] == [
        ("one two three four five", 1),
        ("six seven\n\neight", 3),
    ]


@pytest.mark.parametrize("name", ["notes.txt", "c4.jsonl"])
def test_cli_inspect_says_text_documents_and_convert_refuses_them(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"text": "A page."}\n' if name.endswith(".jsonl") else "A page.\n")
    result = runner.invoke(data_app, ["inspect", str(path)])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "format: text (documents)",
        "documents: 1",
        "characters: 7",
        "unreadable: 0",
    ]
    result = runner.invoke(data_app, ["convert", str(path), str(tmp_path / "o.jsonl"), "--to", "openai"])
    assert result.exit_code == 2
    assert "holds documents (format text), not conversation records" in result.output


def test_collect_puts_text_sources_in_the_documents_file_and_counts_them(tmp_path):
    from tuneline.recipe import FileSource
    from tuneline.sources.collect import DOCUMENT_REJECTS, run_collect
    from tuneline.store import DOCUMENTS, iter_jsonl, iter_records, read_stats

    pages = write_jsonl(tmp_path / "c4.jsonl", [{"text": "A page."}, {"text": ""}])
    (tmp_path / "notes.txt").write_text("Lamps give light.\n")
    dataset = write_jsonl(tmp_path / "a.jsonl", [ALPACA_ROW])
    sources = [FileSource(name=p.stem, path=str(p)) for p in (pages, tmp_path / "notes.txt", dataset)]
    ref = run_collect(tmp_path / "store", sources)
    documents = list(iter_jsonl(ref.file(DOCUMENTS)))
    assert [(d["text"], d["source"], d["url"]) for d in documents] == [
        ("A page.", "c4", str(pages)),
        ("Lamps give light.", "notes", str(tmp_path / "notes.txt")),
    ]
    stats = read_stats(ref)
    assert stats["documents"] == {"in": 3, "out": 2, "dropped": {"unreadable": 1}}
    assert stats["sources"]["c4"]["documents"] == 1 and stats["sources"]["a"]["records"] == 1
    [reject] = list(iter_jsonl(ref.file(DOCUMENT_REJECTS)))
    assert reject["detail"] == f"{pages}:2: text: empty, so there is no document"
    assert len(list(iter_records(ref))) == 1


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ({"name": "notes", "path": "docs/notes.md"}, True),
        ({"name": "pages", "path": "pages.jsonl", "format": "text"}, True),
        ({"name": "pairs", "path": "pairs.jsonl"}, False),
    ],
)
def test_a_text_source_grounds_augmentation_in_a_recipe(source, ok):
    from tuneline.recipe import RecipeError, validate_recipe

    teacher = {"base_url": "http://127.0.0.1:9/v1", "model": "t", "recordings": "recordings"}
    data = {"name": "d", "sources": [source], "model": {"name": "m"}, "register": {"model_name": "m"},
            "augment": {"mode": "documents", "teacher": teacher}}  # fmt: skip
    if ok:
        assert validate_recipe(data).sources[0].name == source["name"]
    else:
        with pytest.raises(RecipeError, match=r"or a text source \(a .txt/.md file, or format: text\)"):
            validate_recipe(data)
