"""Augmentation rounds against the loopback OpenAI server: automatic checks counted by reason, the
feedback loop (round 2's prompt carries round 1's reject reasons and edits), provenance of accepted
records, stop rules, the merge stage's ledger, grounded pairs keeping their URL, record/replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import openai_server, server_error

from tuneline.augment.checks import rouge_l, split_text
from tuneline.augment.review import auto_decide
from tuneline.augment.rounds import (
    CANDIDATES,
    PROMPT,
    AugmentError,
    ReviewedRound,
    apply_decisions,
    next_round_or_stop,
    read_candidates,
    round_summary,
    run_augment_merge,
    run_generate_round,
    summarize_mistakes,
)
from tuneline.augment.teacher import TeacherError
from tuneline.curate.clean import run_clean
from tuneline.recipe import AugmentSpec, CleanSpec, FileSource, RecipeError, load_recipe, validate_recipe
from tuneline.sources.collect import DOCUMENTS, run_collect
from tuneline.store import REJECTS, check_ledger, find_stage, iter_records, read_stats, write_stage

SYSTEM = "Label the customer message with its intent."
SEEDS = [
    ("where is my order 51234?", "shipping_status"),
    ("I want my money back for the blender", "refund"),
    ("cancel order 88812 please", "cancel_order"),
    ("I forgot my password", "reset_password"),
    ("what time does the Lyon store open", "store_hours"),
    ("I was charged twice for order 40021", "billing_issue"),
]


def candidates(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"instruction": text, "input": "", "output": label} for text, label in pairs]


def reply(*items: object) -> str:
    return json.dumps({"candidates": list(items)})


# Round 1 of a teacher that makes the usual mistakes: prose instead of JSON, a copied seed,
# a blocked phrase, a missing output, a one-word answer, unknown fields.
ROUND_ONE = [
    "Sure! Here are five new examples of customer messages:",
    reply(
        *candidates(
            ("the toaster I got on Friday sparks when I plug it in, I'd like a refund", "refund"),
            ("my parcel with the yoga mat still shows 'label created' after a week", "shipping_status"),
            ("where is my order 51234 ??", "shipping_status"),
            ("As an AI language model I cannot cancel, but cancel order 1 please", "cancel_order"),
        ),
        {"instruction": "please move my delivery to Porto", "input": ""},
        {"instruction": "hi", "output": "x"},
        {"question": "is the desk lamp dimmable?", "answer": "product_info"},
    ),
]


def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    rows = [{"system": SYSTEM, "instruction": text, "input": "", "output": label} for text, label in SEEDS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_spec(server, tmp_path: Path, **changes) -> AugmentSpec:
    """Rounds of 10 in requests of 5; a server of None stands for one that is down (replay)."""
    teacher = {
        "base_url": server.base_url if server else "http://127.0.0.1:9/v1",
        "model": "teacher-1",
        "mode": "record",
        "recordings": str(tmp_path / "recordings"),
        "max_retries": 0,
        "timeout_s": 10,
    }
    settings = {
        "teacher": teacher,
        "per_round": 10,
        "per_request": 5,
        "examples_per_request": 3,
        "checks": {"min_chars": 12, "blocklist": ["as an AI language model"]},
    }
    return AugmentSpec.model_validate(settings | changes)


@pytest.fixture
def collected(tmp_path: Path):
    """A collect stage over the seed file: its records are the seeds when the recipe names none."""
    return run_collect(tmp_path / "art", [FileSource(name="seeds", path=str(seed_file(tmp_path)))])


def decide(ref, kinds: dict[int, str], reason: str = "wrong intent label") -> list[dict]:
    """Decisions on a round's candidates by position: accept, reject (with `reason`) or edit."""
    decisions = []
    for index, candidate in enumerate(read_candidates(ref)):
        kind = kinds.get(index, "accept")
        decision = {
            "id": candidate["id"],
            "decision": kind,
            "reviewer": "ana",
            "at": "2026-11-21T15:00:00+00:00",
        }
        if kind == "reject":
            decision["reason"] = reason
        if kind == "edit":
            messages = [dict(m) for m in candidate["messages"]]
            messages[-1]["content"] = "complaint"
            decision["messages"] = messages
        decisions.append(decision)
    return decisions


def test_round_checks_candidates_and_counts_rejects_by_reason(tmp_path, collected):
    with openai_server(ROUND_ONE) as server:
        spec = make_spec(server, tmp_path)
        ref = run_generate_round(tmp_path / "art", spec, collected, 1, [])
        assert server.count == 2
    stats = read_stats(ref)
    assert stats["rejected"] == {
        "blocklisted": 1, "missing_field": 1, "near_duplicate_seed": 1, "parse_error": 2, "too_short": 1,
    }  # fmt: skip
    assert stats["passed"] == 2 and stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    assert check_ledger(ref) == {"in": 8, "out": 2, "dropped": stats["rejected"]}
    rejects = list(iter_records(ref, REJECTS))
    prose = [r for r in rejects if r["reason"] == "parse_error" and "reply" in r["record"]]
    assert prose[0]["record"]["reply"].startswith("Sure!") and "not JSON" in prose[0]["detail"]
    copied = next(r for r in rejects if r["reason"] == "near_duplicate_seed")
    assert "ROUGE-L" in copied["detail"] and copied["record"]["messages"][1]["content"].startswith("where is")

    passed = read_candidates(ref)
    prompt = json.loads(ref.file(PROMPT).read_text())
    assert [r["messages"][0] for r in passed] == [{"role": "system", "content": SYSTEM}] * 2  # seeds' system
    for record in passed:
        meta = record["meta"]
        assert (meta["origin"], meta["round"], meta["teacher_model"], meta["source"]) == (
            "generated",
            1,
            "teacher-1",
            "augment",
        )
        assert meta["prompt_digest"] in {r["request_digest"][:16] for r in prompt["requests"]}
    # The prompt shows seeds in the answer's own shape and asks for the number per request.
    user = prompt["requests"][0]["messages"][1]["content"]
    assert '"output": "' in user and "Write 5 new examples" in user and "None noticed yet." in user


def test_round_two_prompt_carries_round_one_mistakes_and_edits(tmp_path, collected):
    round_two = reply(*candidates(("the blender lid cracked on the first use, refund please", "refund")))
    with openai_server([*ROUND_ONE, round_two, round_two]) as server:
        spec = make_spec(server, tmp_path)
        first = run_generate_round(tmp_path / "art", spec, collected, 1, [])
        history = [
            ReviewedRound(round_no=1, generated=first, decisions=decide(first, {0: "reject", 1: "edit"}))
        ]
        second = run_generate_round(tmp_path / "art", spec, collected, 2, history)
        sent = [request.user_text for request in server.requests[2:]]
    assert len(sent) == 2
    for text in sent:
        assert "wrong intent label (1x)" in text
        assert "copied or closely paraphrased one of the given examples (1x)" in text
        assert "the reply was not the requested JSON object" in text and "(2x)" in text
        assert 'used the blocked phrase "as an AI language model" (1x)' in text
        assert "shorter than 12 characters (1x)" in text
        assert '-> "complaint"' in text  # the reviewer's edit, before -> after
    assert json.loads(second.file(PROMPT).read_text())["mistakes"] == summarize_mistakes(history)
    # Both requests got the same answer: the second copy is a near duplicate of the pool.
    assert read_stats(second)["rejected"] == {"near_duplicate_pool": 1}


def test_decisions_give_provenance_and_keep_rejects_with_reasons(tmp_path, collected):
    with openai_server(ROUND_ONE) as server:
        ref = run_generate_round(tmp_path / "art", make_spec(server, tmp_path), collected, 1, [])
    first, second = read_candidates(ref)
    decisions = [
        {"id": first["id"], "decision": "accept", "reviewer": "ana", "at": "t1"},
        {"id": second["id"], "decision": "reject", "reason": "label should be shipping_status",
         "reviewer": "bo", "at": "t2"},
        {"id": first["id"], "decision": "edit", "reviewer": "ana", "at": "t3",
         "messages": [*first["messages"][:-1], {"role": "assistant", "content": "complaint"}]},
    ]  # fmt: skip
    accepted, rejected = apply_decisions([first, second], decisions)
    (edited,) = accepted  # the last decision on a candidate counts
    assert edited["meta"]["origin"] == "edited" and edited["meta"]["edited_from"] == first["id"]
    assert edited["id"] != first["id"] and edited["messages"][-1]["content"] == "complaint"
    assert edited["meta"]["review"] == {"decision": "edit", "reviewer": "ana", "at": "t3"}
    assert edited["meta"]["round"] == 1 and edited["meta"]["teacher_model"] == "teacher-1"
    assert rejected[0]["reason"] == "rejected_in_review"
    assert rejected[0]["detail"] == "label should be shipping_status"
    assert rejected[0]["record"]["meta"]["review"]["reviewer"] == "bo"

    accepted, rejected = apply_decisions([first, second], decisions[:1])
    assert accepted[0]["meta"]["origin"] == "generated" and accepted[0]["id"] == first["id"]
    assert rejected[0]["reason"] == "not_reviewed"
    with pytest.raises(AugmentError, match="not in this round"):
        apply_decisions([first], [{"id": "nope", "decision": "accept", "reviewer": "x", "at": "t"}])
    with pytest.raises(AugmentError, match=first["id"]):
        apply_decisions(
            [first], [{**decisions[2], "messages": [{"role": "user", "content": "only a question"}]}]
        )


def fake_round(artifacts_dir: Path, round_no: int, passed: int, auto_rejected: int) -> ReviewedRound:
    """A round stage written directly (no teacher): `passed` candidates, `auto_rejected` drops."""
    with write_stage(artifacts_dir, "augment_round", f"fake{round_no}") as writer:
        for index in range(passed):
            messages = [{"role": "user", "content": f"question {round_no}.{index}"},
                        {"role": "assistant", "content": "answer"}]  # fmt: skip
            writer.count_in()
            writer.keep({"id": f"r{round_no}c{index}", "messages": messages, "tools": None,
                         "meta": {"origin": "generated", "round": round_no}}, CANDIDATES)  # fmt: skip
        for index in range(auto_rejected):
            writer.count_in()
            writer.drop({"round": round_no, "request": index, "reply": "oops"}, "parse_error", "not JSON")
        writer.stats = {"prompt_tokens": 100, "completion_tokens": 50}
    ref = find_stage(artifacts_dir, "augment_round", f"fake{round_no}")
    return ReviewedRound(round_no=round_no, generated=ref, decisions=[])


def reviewed(round_: ReviewedRound, accept: int) -> ReviewedRound:
    """The round with its first `accept` candidates accepted and the rest rejected."""
    kinds = {index: "accept" if index < accept else "reject" for index in range(100)}
    return round_.model_copy(update={"decisions": decide(round_.generated, kinds, "off topic")})


@pytest.mark.parametrize(
    ("rounds", "settings", "expected"),
    [
        ([(10, 0, 10)], {"target_accepted": 10}, "target reached: 10 accepted"),
        ([(10, 0, 6), (10, 0, 6)], {"target_accepted": 12}, "target reached: 12 accepted"),
        (
            [(8, 2, 4)],
            {"min_acceptance_rate": 0.5},
            "acceptance below the floor: round 1 accepted 4 of 10 (40%",
        ),
        ([(10, 0, 5)], {"min_acceptance_rate": 0.5}, None),
        ([(10, 0, 5), (10, 0, 5)], {"max_rounds": 2}, "round limit reached: 2 round(s)"),
        ([(10, 0, 5)], {"max_rounds": 2}, None),
    ],
)
def test_stop_rules(tmp_path, rounds, settings, expected):
    spec = make_spec(None, tmp_path, **settings)
    history = [
        reviewed(fake_round(tmp_path, n + 1, passed, auto), ok) for n, (passed, auto, ok) in enumerate(rounds)
    ]
    stop = next_round_or_stop(history, spec)
    assert stop == expected if expected is None else stop.startswith(expected)
    assert next_round_or_stop([], spec) is None


def test_merge_adds_accepted_records_before_clean_with_a_consistent_ledger(tmp_path, collected):
    art = tmp_path / "art"
    rounds = [reviewed(fake_round(art, 1, 5, 2), 3), reviewed(fake_round(art, 2, 4, 0), 4)]
    summary = round_summary(rounds[0])
    assert summary | {"auto_rejected": None} == {
        "round": 1, "generated": 7, "auto_rejected": None, "reviewed": 5, "accepted": 3, "edited": 0,
        "rejected_in_review": 2, "acceptance_rate": 3 / 7, "prompt_tokens": 100, "completion_tokens": 50,
    }  # fmt: skip
    merged = run_augment_merge(art, collected, rounds)
    assert check_ledger(merged) == {
        "in": 6 + 7 + 4,
        "out": 6 + 7,
        "dropped": {"parse_error": 2, "rejected_in_review": 2},
    }
    records = list(iter_records(merged))
    assert [r["meta"]["origin"] for r in records] == ["collected"] * 6 + ["generated"] * 7
    assert all(r["meta"]["review"]["reviewer"] == "ana" for r in records[6:])
    assert [r["detail"] for r in iter_records(merged, REJECTS)].count("off topic") == 2
    stats = read_stats(merged)
    assert (stats["collected"], stats["generated"], stats["accepted"]) == (6, 11, 7)
    assert run_augment_merge(art, collected, rounds) == merged  # cached by content
    cleaned = run_clean(art, merged, CleanSpec(workers=1, near_dedup=False))
    assert check_ledger(cleaned)["in"] == 13


DOCUMENT = (
    "Returns policy\n\nYou can return any item within 30 days of delivery for a full refund. Items must "
    "be unused and in their original packaging.\n\nRefunds are paid to the original payment method "
    "within 5 business days after the warehouse receives the parcel."
)


def test_documents_mode_grounds_pairs_in_chunks_and_keeps_the_url(tmp_path):
    art = tmp_path / "art"
    with write_stage(art, "collect", "docs") as writer:
        row = {"text": DOCUMENT, "url": "https://shop.example/returns", "title": "Returns", "source": "help"}
        writer.path(DOCUMENTS).write_text(json.dumps(row) + "\n", encoding="utf-8")
    source = find_stage(art, "collect", "docs")
    pairs = reply(
        {"instruction": "How long do I have to return an item?", "output": "30 days from delivery."},
        {"messages": [{"role": "user", "content": "When is my refund paid?"},
                      {"role": "assistant", "content": "Within 5 business days after the parcel arrives."}]},
    )  # fmt: skip
    with openai_server(lambda request: pairs) as server:
        spec = make_spec(server, tmp_path, mode="documents", chunk_chars=200, per_round=4, per_request=2)
        ref = run_generate_round(art, spec, source, 1, [])
        shown = [request.user_text for request in server.requests]
    # One chunk per request (requests arrive in any order).
    assert sorted("within 30 days" in text for text in shown) == [False, True]
    assert sorted("5 business days" in text for text in shown) == [False, True]
    passed = read_candidates(ref)
    assert {r["meta"]["url"] for r in passed} == {"https://shop.example/returns"}
    assert read_stats(ref)["rejected"] == {"near_duplicate_pool": 2}  # the second request's copies
    assert passed[0]["messages"][0] == {"role": "user", "content": "How long do I have to return an item?"}

    data = {"name": "d", "sources": [{"name": "f", "path": "x.jsonl"}], "model": {"name": "m"},
            "register": {"model_name": "m"}, "augment": spec.model_dump()}  # fmt: skip
    with pytest.raises(RecipeError, match="add a crawl source with mode: documents"):
        validate_recipe(data)


def test_teacher_errors_are_counted_and_a_rerun_asks_nothing(tmp_path, collected):
    good = reply(*candidates(("the smart watch strap broke after two days, money back please", "refund")))
    with openai_server([server_error(500), good]) as server:
        spec = make_spec(server, tmp_path)
        ref = run_generate_round(tmp_path / "art", spec, collected, 1, [])
        assert read_stats(ref)["rejected"] == {"teacher_error": 1} and len(read_candidates(ref)) == 1
        assert run_generate_round(tmp_path / "art", spec, collected, 1, []) == ref
        assert server.count == 2


def test_a_seed_file_of_another_format_is_shown_and_its_unreadable_lines_listed(tmp_path, collected):
    path = tmp_path / "seeds.sharegpt.jsonl"
    turns = [
        {"from": "human", "value": "my blender smells like burning"},
        {"from": "gpt", "value": "complaint"},
    ]
    path.write_text(json.dumps({"conversations": turns}) + "\n{broken\n", encoding="utf-8")
    good = reply(*candidates(("the yoga mat is peeling after one week of use", "complaint")))
    with openai_server(lambda request: good) as server:
        spec = make_spec(server, tmp_path, seeds={"path": str(path)}, per_round=5)
        ref = run_generate_round(tmp_path / "art", spec, collected, 1, [])
        shown = server.requests[0].user_text
    assert '{"instruction": "my blender smells like burning", "output": "complaint"}' in shown
    stats = read_stats(ref)
    assert stats["seeds"] == 1 and stats["unreadable_seeds"][0].startswith(f"{path}:2: ")
    assert read_candidates(ref)[0]["messages"][0]["role"] == "user"  # sharegpt seeds have no system prompt


def test_a_recorded_round_replays_offline_with_the_same_candidates(tmp_path, collected):
    with openai_server(ROUND_ONE) as server:
        recorded = run_generate_round(tmp_path / "art", make_spec(server, tmp_path), collected, 1, [])
    spec = make_spec(
        None, tmp_path, teacher={**make_spec(None, tmp_path).teacher.model_dump(), "mode": "replay"}
    )
    replayed = run_generate_round(tmp_path / "elsewhere", spec, collected, 1, [])
    assert read_candidates(replayed) == read_candidates(recorded)
    assert read_stats(replayed)["from_recording"] == 2  # both replies, the unparseable one too
    with pytest.raises(TeacherError, match="no recording"):
        run_generate_round(tmp_path / "elsewhere", spec, collected, 2, [])


def test_similarity_and_chunking_helpers():
    assert rouge_l("where is my order 51234?", "Where is my order 51234 ??") == 1.0
    assert rouge_l("where is my order", "cancel the blender") == 0.0
    assert 0.5 < rouge_l("please cancel my order today", "cancel my order please") < 1.0
    chunks = split_text(DOCUMENT, 120)
    assert all(len(chunk) <= 120 for chunk in chunks) and " ".join(chunks).count("30 days") == 1
    assert split_text("word " * 100, 50)[0].endswith("word")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "Write like these: {examples}"}, "needs the placeholder(s) {mistakes}"),
        ({"prompt": "{examples} {mistakes} {topic}"}, "unknown placeholder(s) {topic}"),
        ({"mode": "documents", "prompt": "{examples} {mistakes}"}, "needs the placeholder(s) {document}"),
        ({"checks": {"blocklist": ["(unclosed"]}}, "not a valid regular expression"),
        ({"per_request": 30}, "per_request 30 is larger than per_round 20"),
    ],
)
def test_recipe_rejects_an_unusable_augment_section(changes, message):
    data = {"teacher": {"base_url": "http://localhost:8000/v1", "model": "m"}, **changes}
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(").replace(")", r"\)")):
        AugmentSpec.model_validate(data)


def test_the_demo_recipe_replays_its_shipped_recording_offline(tmp_path, monkeypatch):
    """recipes/augment_demo.yaml runs on a fresh machine: every request of its three rounds is in
    the shipped recording (re-record with recipes/data/record_augment_demo.py when prompts change)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    recipe = load_recipe("recipes/augment_demo.yaml")
    spec = recipe.augment
    assert spec.teacher.mode == "replay" and spec.review.how == "auto"
    collected = run_collect(tmp_path, recipe.sources)
    history: list[ReviewedRound] = []
    stop = None
    while stop is None:
        generated = run_generate_round(tmp_path, spec, collected, len(history) + 1, history)
        decisions = [d.model_dump() for d in auto_decide(spec.review.auto, read_candidates(generated))]
        history.append(ReviewedRound(round_no=len(history) + 1, generated=generated, decisions=decisions))
        stop = next_round_or_stop(history, spec)
    assert stop.startswith("target reached: 54 accepted")
    assert "contains personal data" in json.loads(history[1].generated.file(PROMPT).read_text())["mistakes"]
    merged = run_augment_merge(tmp_path, collected, history)
    assert check_ledger(merged)["out"] == 40 + 54
    assert {r["meta"]["review"]["reviewer"] for r in iter_records(merged) if "review" in r["meta"]} == {
        "auto-policy"
    }
