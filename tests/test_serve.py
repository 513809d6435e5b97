"""`tuneline serve`: the registered champion behind `transformers serve`, used by real clients
(the official `openai` client, lm-evaluation-harness's API model) on a loopback port the OS chose."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from openai import AsyncOpenAI, OpenAI
from register_fixtures import CONVERSATIONS, MODEL_NAME, registered_store
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.errors import UserError
from tuneline.recipe import ModelSpec
from tuneline.register import serve
from tuneline.register.serve import ServedModel, resolve_model, server_command

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A store with the tiny model registered as version 1 (@champion)."""
    return registered_store(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(registered):
    """`tuneline serve models:/tiny-chat@champion --port 0` as a user starts it; stopped after."""
    command = [str(Path(sys.executable).parent / "tuneline"), "serve", f"models:/{MODEL_NAME}@champion"]
    command += ["--artifacts-dir", str(registered["store"]), "--tracking-uri", registered["tracking_uri"]]
    log = (registered["root"] / "serve.log").open("w")
    # No continuous batching here: its warm-up adds ~20 s to the start (the benchmark measures it).
    command += ["--port", "0", "--no-continuous-batching"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = ""
        while "base_url" not in line and process.poll() is None:
            line = process.stdout.readline()
        assert "base_url" in line, (registered["root"] / "serve.log").read_text()
        base_url, model = line.split()[2], line.split()[4]
        yield {"base_url": base_url, "model": model, "process": process}
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def expected(server):
    """generate_replies' greedy replies on the test conversations, from the served folder."""
    from tuneline.evaluate.stage import generate_replies
    from tuneline.models import load_tokenizer, load_trained

    model, tokenizer = load_trained(server["model"]), load_tokenizer(ModelSpec(name=server["model"]))
    return generate_replies(model, tokenizer, CONVERSATIONS, max_new_tokens=MAX_TOKENS, batch_size=1)


def client_for(server) -> OpenAI:
    return OpenAI(base_url=server["base_url"], api_key="unused", timeout=60)


def test_chat_replies_equal_the_evaluate_stages_and_end_where_it_ends(server, expected):
    client = client_for(server)
    replies = [
        client.chat.completions.create(
            model=server["model"], messages=c, max_tokens=MAX_TOKENS, temperature=0
        ).choices[0]
        for c in CONVERSATIONS
    ]
    assert [r.message.content.strip() for r in replies] == expected
    assert all(r.finish_reason in ("stop", "length") for r in replies)


def test_streamed_reply_is_the_same_reply(server, expected):
    stream = client_for(server).chat.completions.create(
        model=server["model"], messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks).strip() == expected[0]


def test_concurrent_requests_each_get_their_own_reply(server, expected):
    client = AsyncOpenAI(base_url=server["base_url"], api_key="unused", timeout=60)

    async def ask_all() -> list[str]:
        requests = [
            client.chat.completions.create(
                model=server["model"], messages=c, max_tokens=MAX_TOKENS, temperature=0
            )
            for c in CONVERSATIONS * 2
        ]
        return [r.choices[0].message.content.strip() for r in await asyncio.gather(*requests)]

    assert asyncio.run(ask_all()) == expected * 2


def test_models_health_and_completions(server):
    client = client_for(server)
    assert [m.id for m in client.models.list()] == [server["model"]]
    root = server["base_url"].removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/health", timeout=10) as response:
        assert json.load(response) == {"status": "ok"}
    completion = client.completions.create(
        model=server["model"], prompt="Where is my", max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.usage.completion_tokens > 0


def test_the_teacher_client_of_another_recipe_reaches_the_served_model(server, tmp_path):
    from tuneline.augment.teacher import TeacherError, ask_teacher
    from tuneline.recipe import TeacherSpec

    spec = TeacherSpec(
        base_url=server["base_url"], model=server["model"], mode="live", recordings=str(tmp_path),
        temperature=0, max_tokens=MAX_TOKENS, json_mode=False, concurrency=2,
    )  # fmt: skip
    # The tiny model never says its end-of-turn token, so every reply runs into max_tokens: the
    # teacher client got the served model's replies and refuses them as cut off, as it would from
    # any endpoint (a real model ends its turn; the benchmark's SmolLM2 replies do).
    with pytest.raises(
        TeacherError, match=r"all 4 request\(s\) failed; the first: reply cut off at max_tokens=6"
    ):
        ask_teacher(spec, CONVERSATIONS)


def test_lm_eval_scores_the_served_model(server, tmp_path):
    import lm_eval

    rows = [{"question": q, "answer": "ok"} for q in ("Where is my refund?", "Is the app down?")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'rows.jsonl'}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  max_gen_toks: 6\n  until: []\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    url = server["base_url"] + "/chat/completions"
    # lm-eval sends its eos_string (default <|endoftext|>) as a stop string; transformers serve
    # refuses a stop string the tokenizer cannot spell (400), so name the model's own end of turn.
    model_args = f"model={server['model']},base_url={url},tokenized_requests=False,tokenizer_backend=None"
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=model_args + ",eos_string=<|im_end|>",
        tasks=["tiny_gen"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
    )
    scores = results["results"]["tiny_gen"]
    assert scores["exact_match,none"] == 0.0  # the tiny model answers noise, but it was asked and scored
    assert len(results["samples"]["tiny_gen"]) == 2


def test_an_unknown_alias_lists_the_versions_and_aliases(registered):
    result = CliRunner().invoke(
        app,
        [
            "serve",
            f"models:/{MODEL_NAME}@prod",
            "--artifacts-dir",
            str(registered["store"]),
            "--tracking-uri",
            registered["tracking_uri"],
        ],
    )
    assert result.exit_code == 2
    assert "no alias @prod; its versions: 1; aliases: @candidate -> 1, @champion -> 1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("models:/tiny-chat/9", "no version 9; its versions: 1"),
        ("models:/nobody@champion", "no registered model named 'nobody'; registered models: tiny-chat"),
        ("models:/tiny-chat", "write models:/NAME@ALIAS"),
        ("no/such/folder", "no/such/folder: not a model folder"),
    ],
)
def test_models_that_do_not_exist_are_clear_errors(registered, model, message):
    with pytest.raises(UserError, match=message):
        resolve_model(model, registered["store"], registered["tracking_uri"])


def test_a_version_is_served_from_its_train_stage_else_downloaded(registered):
    store, uri = registered["store"], registered["tracking_uri"]
    served = resolve_model(f"models:/{MODEL_NAME}/1", store, uri)
    assert served.folder == (store / "stages" / "train" / "t-first" / "model").resolve()
    assert resolve_model(str(store / "stages" / "train" / "t-first"), store, uri).folder == served.folder
    elsewhere = registered["root"] / "other-store"
    elsewhere.mkdir()
    downloaded = resolve_model(f"models:/{MODEL_NAME}@champion", elsewhere, uri).folder
    assert (downloaded / "config.json").is_file() and elsewhere in downloaded.parents


def test_vllm_is_refused_here_with_the_reason_and_chosen_where_it_runs(monkeypatch, tmp_path):
    served = ServedModel(tmp_path, "m")
    with pytest.raises(UserError, match="--engine vllm: vLLM is not installed here"):
        server_command(served, engine="vllm")
    with pytest.raises(UserError, match="transformers serve checks no API key"):
        server_command(served, api_key="secret")
    monkeypatch.setattr(serve, "check_vllm", lambda: None)
    command = server_command(served, engine="vllm", port=0, api_key="secret")
    assert command == [
        "vllm",
        "serve",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--api-key",
        "secret",
    ]


def test_a_server_that_dies_at_start_is_an_error_with_its_output():
    started = time.monotonic()
    dying = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    with pytest.raises(UserError, match="did not start.*boom"), serve.running_server(dying):
        pass
    assert time.monotonic() - started < 10
