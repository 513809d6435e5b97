"""Chain-of-thought distillation: a teacher's reasoning and final answer become a record whose
assistant turn carries `reasoning_content`, checked, reviewed, recorded and replayed like the other
augment modes; formats keep or report the reasoning; training includes or drops it; evaluation
scores the final answer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import Reply, openai_server

from tuneline.augment.review import auto_decide
from tuneline.augment.rounds import (
    PROMPT,
    ReviewedRound,
    read_candidates,
    run_augment_merge,
    run_generate_round,
    summarize_mistakes,
)
from tuneline.curate.clean import run_clean
from tuneline.formats.codecs import Format, parse_object, to_format
from tuneline.recipe import AugmentSpec, CleanSpec, FileSource
from tuneline.records import RecordError, make_record, split_think
from tuneline.sources.collect import run_collect
from tuneline.store import REJECTS, check_ledger, iter_records, read_stats

SYSTEM = "Answer the arithmetic question with a number."
QUESTIONS = {
    "What is 17 + 25?": "42",
    "What is 9 * 8?": "72",
    "What is 100 - 37?": "63",
    "What is 144 / 12?": "12",
    "What is 3 * 13 + 1?": "40",
    "What is 2 ** 5?": "32",
}
STEPS = "Take the two numbers, add the units first, carry the ten, then add the tens to get the result."

# One teacher reply per question: the good shapes (JSON, the server's reasoning_content field, a
# <think> block), then the mistakes the checks must name.
REPLIES = {
    "What is 17 + 25?": json.dumps({"reasoning": STEPS, "answer": "42"}),
    "What is 9 * 8?": Reply(content="72", reasoning="Nine times eight is nine eights: 8+8+... which is 72."),
    "What is 100 - 37?": f"<think>\n{STEPS}\n</think>\n\n63",
    "What is 144 / 12?": json.dumps({"reasoning": STEPS + " So the answer is 12.", "answer": ""}),
    "What is 3 * 13 + 1?": json.dumps({"reasoning": STEPS, "answer": "See the reasoning above."}),
    "What is 2 ** 5?": json.dumps({"reasoning": "2*2*2*2*2", "answer": "32"}),
}


def script(request) -> str | Reply:
    return next(answer for question, answer in REPLIES.items() if question in request.user_text)


def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    rows = [{"system": SYSTEM, "instruction": q, "input": "", "output": a} for q, a in QUESTIONS.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_spec(server, tmp_path: Path, mode: str = "record") -> AugmentSpec:
    teacher = {
        "base_url": server.base_url if server else "http://127.0.0.1:9/v1",
        "model": "reasoner",
        "mode": mode,
        "recordings": str(tmp_path / "recordings"),
        "max_retries": 0,
        "timeout_s": 10,
    }
    return AugmentSpec.model_validate(
        {
            "mode": "cot",
            "teacher": teacher,
            "per_round": 6,
            "review": {"how": "auto", "auto": {"default": "accept"}},
        }
    )


@pytest.fixture
def collected(tmp_path: Path):
    return run_collect(tmp_path / "art", [FileSource(name="questions", path=str(seed_file(tmp_path)))])


def test_cot_round_keeps_reasoning_and_rejects_replies_without_a_final_answer(tmp_path, collected):
    with openai_server(script) as server:
        ref = run_generate_round(tmp_path / "art", make_spec(server, tmp_path), collected, 1, [])
        sent = server.requests[0].messages
    assert (
        '"reasoning"' in sent[0]["content"] and SYSTEM in sent[1]["content"]
    )  # asks for JSON; shows the task
    stats = read_stats(ref)
    assert stats["passed"] == 3
    assert stats["rejected"] == {
        "missing_answer": 1,
        "answer_refers_to_reasoning": 1,
        "reasoning_too_short": 1,
    }
    rejects = {r["reason"]: r for r in iter_records(ref, REJECTS)}
    assert "no final answer" in rejects["missing_answer"]["detail"]
    assert (
        "'See the reasoning above.' points at the reasoning"
        in rejects["answer_refers_to_reasoning"]["detail"]
    )
    assert "checks.min_reasoning_chars 40" in rejects["reasoning_too_short"]["detail"]

    candidates = {c["messages"][1]["content"]: c for c in read_candidates(ref)}
    assert set(candidates) == {"What is 17 + 25?", "What is 9 * 8?", "What is 100 - 37?"}
    for question, candidate in candidates.items():
        system, _, answer = candidate["messages"]
        assert system == {"role": "system", "content": SYSTEM}
        assert answer["content"] == QUESTIONS[question] == candidate["meta"]["reference"]
        assert len(answer["reasoning_content"]) >= 40 and "<think>" not in answer["reasoning_content"]
    assert candidates["What is 9 * 8?"]["messages"][2]["reasoning_content"].startswith("Nine times eight")

    # Review as for the other modes: accepted records reach clean with their reasoning.
    decisions = [
        d.model_dump() for d in auto_decide(make_spec(None, tmp_path).review.auto, read_candidates(ref))
    ]
    history = [ReviewedRound(round_no=1, generated=ref, decisions=decisions)]
    merged = run_augment_merge(tmp_path / "art", collected, history)
    generated = [r for r in iter_records(merged) if r["meta"]["origin"] == "generated"]
    assert len(generated) == 3 and all("reasoning_content" in r["messages"][-1] for r in generated)
    # Each answered seed is replaced by its record with reasoning (else clean keeps one of the two).
    assert check_ledger(merged) == {
        "in": 12,
        "out": 6,
        "dropped": {**stats["rejected"], "replaced_by_reasoning": 3},
    }
    replaced = [r for r in iter_records(merged, REJECTS) if r["reason"] == "replaced_by_reasoning"]
    assert {r["record"]["messages"][1]["content"] for r in replaced} == set(candidates)
    assert replaced[0]["detail"].startswith("answered step by step by the teacher as record ")
    cleaned = run_clean(tmp_path / "art", merged, CleanSpec())
    assert sum("reasoning_content" in r["messages"][-1] for r in iter_records(cleaned)) == 3
    mistakes = summarize_mistakes(history)
    assert 'left "answer" empty' in mistakes and "shorter than 40 characters" in mistakes


def test_a_recorded_cot_round_replays_offline_with_the_servers_reasoning(tmp_path, collected):
    with openai_server(script) as server:
        recorded = run_generate_round(tmp_path / "art", make_spec(server, tmp_path), collected, 1, [])
    replayed = run_generate_round(
        tmp_path / "elsewhere", make_spec(None, tmp_path, "replay"), collected, 1, []
    )
    assert read_candidates(replayed) == read_candidates(recorded)
    assert read_stats(replayed)["from_recording"] == 6
    prompt = json.loads(replayed.file(PROMPT).read_text())
    assert [r["reference"] for r in prompt["requests"]] == list(QUESTIONS.values())


def test_reasoning_content_survives_openai_and_sharegpt_and_is_reported_lost_by_alpaca():
    line = {
        "messages": [
            {"role": "user", "content": "What is 17 + 25?"},
            {"role": "assistant", "content": "42", "reasoning_content": STEPS},
        ]
    }
    (conversation,) = parse_object(line, Format.OPENAI)
    record = make_record(conversation.messages)
    assert record["messages"][1]["reasoning_content"] == STEPS
    openai, losses = to_format(record, "openai")
    assert openai == line and losses == []
    sharegpt, losses = to_format(record, "sharegpt")
    assert sharegpt["conversations"][1] == {"from": "gpt", "value": "42", "reasoning_content": STEPS}
    (back,) = parse_object(sharegpt, Format.SHAREGPT)
    assert back.messages == record["messages"] and losses == []
    alpaca, losses = to_format(record, "alpaca")
    assert alpaca["output"] == "42"
    assert losses == ["reasoning_content: alpaca cannot hold an answer's reasoning; dropped"]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"role": "user", "content": "hi", "reasoning_content": "x"},
            "expected text on an assistant turn, got a user turn",
        ),
        (
            {"role": "assistant", "content": "hi", "reasoning_content": 3},
            "expected text on an assistant turn, got number",
        ),
    ],
)
def test_misplaced_reasoning_is_a_reject_with_its_reason(message, expected):
    with pytest.raises(RecordError, match=expected):
        parse_object({"messages": [{"role": "user", "content": "q"}, message]}, Format.OPENAI)
    with pytest.raises(
        RecordError, match="reasoning_content: only assistant turns carry reasoning, not user"
    ):
        make_record(
            [
                {"role": "user", "content": "q", "reasoning_content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        )


def test_split_think():
    assert split_think("<think>\nadd 17 and 25\n</think>\n\n42") == ("add 17 and 25", "42")
    assert split_think("42") == (None, "42")
    assert split_think("<think>cut off mid-way") == ("cut off mid-way", "")


# ---------------------------------------------------------------- training and evaluation

NATIVE_TEMPLATE = (  # a template with its own reasoning support, as Qwen3's and DeepSeek-R1's
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tuneline import models

    corpus = [STEPS, *QUESTIONS, *QUESTIONS.values()] * 5
    base = models.make_tiny_model(tmp_path_factory.mktemp("cot"), corpus, vocab_size=300, hidden_size=32,
                                  num_layers=2, num_heads=2)  # fmt: skip
    return AutoTokenizer.from_pretrained(base)


def learned_text(tokenizer, record, reasoning: str) -> tuple[str, str]:
    """What a training row of the record puts under the loss (decoded), and its assistant content."""
    from tuneline.train.sft_data import choose_loss_mode, training_row, with_reasoning

    row, reason, detail = training_row(
        with_reasoning(record, tokenizer, reasoning), tokenizer, choose_loss_mode(tokenizer), 512
    )
    assert row is not None, detail
    encoded = tokenizer.apply_chat_template(
        row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    return tokenizer.decode(ids), row["messages"][-1]["content"]


COT_RECORD = make_record(
    [
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "42", "reasoning_content": STEPS},
    ]
)


def test_training_includes_the_reasoning_in_think_tags_or_drops_it(tokenizer):
    assert "reasoning_content" not in (tokenizer.chat_template or "")  # the tiny model's ChatML
    learned, content = learned_text(tokenizer, COT_RECORD, "include")
    assert content == f"<think>\n{STEPS}\n</think>\n\n42"
    assert learned == f"{content}<|im_end|>"  # the loss covers reasoning, then answer, then end of turn
    learned, content = learned_text(tokenizer, COT_RECORD, "drop")
    assert (learned, content) == ("42<|im_end|>", "42")


def test_training_leaves_reasoning_to_a_template_that_renders_it(tokenizer):
    from tuneline.train.sft_data import with_reasoning

    native = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    native.chat_template = NATIVE_TEMPLATE
    turn = with_reasoning(COT_RECORD, native, "include")["messages"][-1]
    assert turn == {"role": "assistant", "content": "42", "reasoning_content": STEPS}
    learned, _ = learned_text(native, COT_RECORD, "include")
    assert learned == f"<think>{STEPS}</think>42<|im_end|>"
    assert "reasoning_content" not in with_reasoning(COT_RECORD, native, "drop")["messages"][-1]


@pytest.mark.parametrize(
    ("reply", "hit"),
    [
        (f"<think>\n{STEPS}\n</think>\n\n42", True),
        ("<think>17 + 25 = 42</think> 42", True),
        ("<think>17 + 25 is 42, so the answer", False),  # cut off before the answer
        ("The answer is 42", False),
        ("42", True),
    ],
)
def test_exact_match_compares_the_final_answer_not_the_reasoning(reply, hit):
    from tuneline.evaluate.stage import exact_match

    assert exact_match([reply], ["42"]) == float(hit)


def test_review_sees_the_reasoning():
    from tuneline.augment.review import reasoning_of
    from tuneline.recipe import AutoPolicy

    policy = AutoPolicy(default="accept", reject_if=[{"pattern": "carry the ten", "reason": "no carrying"}])
    (decision,) = auto_decide(policy, [COT_RECORD])
    assert (decision.decision, decision.reason) == ("reject", "no carrying")
    assert reasoning_of(COT_RECORD) == STEPS


def test_clean_gate_and_split_carry_the_reasoning(tmp_path):
    from tuneline.curate.gate import run_gate
    from tuneline.curate.split import run_split
    from tuneline.recipe import GateSpec, SplitSpec

    path = tmp_path / "cot.jsonl"
    lines = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is {a} + {b}? Show the sum."},
                {
                    "role": "assistant",
                    "content": str(a + b),
                    "reasoning_content": f"{STEPS} Here {a} plus {b}.",
                },
            ]
        }
        for a in range(10, 50, 3)
        for b in (7, 19)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    collected = run_collect(tmp_path / "art", [FileSource(name="cot", path=str(path))])
    stage = run_split(
        tmp_path / "art",
        run_gate(tmp_path / "art", run_clean(tmp_path / "art", collected, CleanSpec()), GateSpec()),
        SplitSpec(),
    )
    kept = [
        r for name in ("train.jsonl", "validation.jsonl", "test.jsonl") for r in iter_records(stage, name)
    ]
    assert len(kept) == len(lines)
    assert all(r["messages"][-1]["reasoning_content"].startswith(STEPS) for r in kept)


def test_the_cot_demo_recipe_replays_its_shipped_recording_offline(tmp_path, monkeypatch):
    """recipes/cot_demo.yaml runs on a fresh machine (re-record with recipes/data/record_cot_demo.py
    when the prompts change); its rounds stop once every question has an accepted answer."""
    from tuneline.augment.rounds import next_round_or_stop
    from tuneline.recipe import load_recipe

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    recipe = load_recipe("recipes/cot_demo.yaml")
    spec = recipe.augment
    assert (spec.mode, spec.teacher.mode, recipe.train.reasoning) == ("cot", "replay", "include")
    collected = run_collect(tmp_path, recipe.sources)
    history: list[ReviewedRound] = []
    stop = None
    while stop is None:
        generated = run_generate_round(tmp_path, spec, collected, len(history) + 1, history)
        decisions = [d.model_dump() for d in auto_decide(spec.review.auto, read_candidates(generated))]
        history.append(ReviewedRound(round_no=len(history) + 1, generated=generated, decisions=decisions))
        stop = next_round_or_stop(history, spec)
    assert stop == "every seed question has an accepted answer (40 accepted)"
    assert 'left "answer" empty' in json.loads(history[1].generated.file(PROMPT).read_text())["mistakes"]
    merged = run_augment_merge(tmp_path, collected, history)
    assert check_ledger(merged)["dropped"]["replaced_by_reasoning"] == 40
    assert all(r["messages"][-1].get("reasoning_content") for r in iter_records(merged))
