"""Base-model selection: candidates scored on the validation split, the recipe's rule picks one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import QUESTIONS, conversation, make_split_and_model

from tuneline import models
from tuneline.errors import UserError
from tuneline.evaluate import select as selection
from tuneline.evaluate.stage import reply_labels
from tuneline.recipe import EvaluateSpec, ModelSpec, SelectSpec, TrainSpec, validate_recipe
from tuneline.store import StageRef, check_ledger, read_manifest, read_stats
from tuneline.train.plan import plan_training

EVALUATE = EvaluateSpec(max_new_tokens=6, batch_size=4)
FULL = TrainSpec(method="full", batch_size=2, max_length=64)


def teach(folder: Path, steps: int = 40) -> None:
    """Train the model in `folder` a few full steps on every labelled question, in place."""
    model = models.load_model(folder).train()
    tokenizer = models.load_tokenizer(ModelSpec(name=str(folder)))
    examples = [
        reply_labels(tokenizer, conversation(q, label)) for label, qs in QUESTIONS.items() for q in qs
    ]
    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 busy cores two threads took 49 s for what one does in 1 s
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A split, a small random model and a larger one trained a little on the labels."""
    root = tmp_path_factory.mktemp("select")
    splits, small = make_split_and_model(root)
    corpus = [m["content"] for qs in QUESTIONS.values() for q in qs for m in conversation(q, "refund")]
    corpus += list(QUESTIONS)
    larger = models.make_tiny_model(
        root / "larger", corpus * 2, vocab_size=300, hidden_size=48, num_layers=2, num_heads=2, seed=1
    )
    teach(larger)
    return {"splits": splits, "small": small.name, "trained": str(larger)}


def memory_by_params(spec: ModelSpec) -> int:
    """A stand-in for the training-memory estimate: 16 bytes a parameter."""
    return 16 * sum(p.numel() for p in models.load_model(spec.name).parameters())


def run(tmp_path, tiny, candidates, select=None, **kwargs):
    model, select = ModelSpec(name=candidates[0], candidates=candidates), select or SelectSpec()
    kwargs.setdefault("train_memory", memory_by_params)
    kwargs.setdefault("resolve", lambda spec: spec)
    return selection.run_select(
        tmp_path / "art",
        tiny["splits"],
        model,
        select,
        EVALUATE,
        echo=lambda _: None,
        **kwargs,
    )


def test_selection_picks_the_candidate_trained_on_the_task(tmp_path, tiny):
    selected, chosen = run(tmp_path, tiny, [tiny["small"], tiny["trained"]])
    stats = read_stats(selected)
    assert chosen.name == tiny["trained"] and chosen.candidates == []
    small, trained = stats["candidates"]
    assert trained["metrics"]["exact_match"] > small["metrics"]["exact_match"]
    assert trained["metrics"]["loss"] < small["metrics"]["loss"]
    assert stats["chosen"] == tiny["trained"] and trained["chosen"] and not small["chosen"]
    assert trained["reason"].startswith("best exact_match (")
    assert small["reason"].startswith("exact_match 0 vs ")
    assert trained["params"] > small["params"] > 0
    assert all(row["tokens_per_second"] > 0 and row["latency_ms"] > 0 for row in stats["candidates"])
    assert stats["rule"]["metric"] == "exact_match" and stats["rule"]["tie_break"] == "fewer parameters"
    assert check_ledger(selected) == {"in": 3, "out": 3, "dropped": {}}  # the validation records


def test_a_memory_budget_leaves_out_the_larger_candidate(tmp_path, tiny):
    plans = {
        name: plan_training(ModelSpec(name=name), FULL).peak_bytes
        for name in (tiny["small"], tiny["trained"])
    }
    budget = (plans[tiny["small"]] + plans[tiny["trained"]]) / 2 / selection.GIB
    select = SelectSpec(max_train_memory_gb=budget)
    selected, chosen = run(
        tmp_path, tiny, [tiny["small"], tiny["trained"]], select, train_memory=lambda s: plans[s.name]
    )
    small, trained = read_stats(selected)["candidates"]
    assert chosen.name == tiny["small"]
    assert trained["train_memory_gb"] == round(plans[tiny["trained"]] / selection.GIB, 3)
    assert "GiB train memory > select.max_train_memory_gb" in trained["reason"] and not trained["chosen"]
    assert small["reason"].startswith("best exact_match") and small["chosen"]

    with pytest.raises(UserError) as error:
        run(tmp_path, tiny, [tiny["small"], tiny["trained"]], SelectSpec(max_train_memory_gb=budget / 100),
            train_memory=lambda s: plans[s.name])  # fmt: skip
    message = str(error.value)
    assert "no candidate is within the budget" in message
    assert (
        f"  {tiny['small']}: exact_match 0, " in message and f"  {tiny['trained']}: exact_match " in message
    )
    assert "relax select.max_train_memory_gb" in message


def test_adding_a_candidate_scores_only_the_new_one(tmp_path, tiny, monkeypatch):
    run(tmp_path, tiny, [tiny["small"]])
    loaded = []
    original = models.load_trained
    monkeypatch.setattr(
        models, "load_trained", lambda name, **kw: loaded.append(name) or original(name, **kw)
    )
    selected, chosen = run(tmp_path, tiny, [tiny["small"], tiny["trained"]])
    assert loaded == [tiny["trained"]]
    assert chosen.name == tiny["trained"] and len(read_stats(selected)["candidates"]) == 2

    loaded.clear()  # a copy of a scored folder is the same content: not scored again
    copy = tmp_path / "copy-of-small"
    shutil.copytree(tiny["small"], copy)
    run(tmp_path, tiny, [str(copy), tiny["trained"]])
    assert loaded == []


def test_few_shot_prepends_train_examples_after_the_system_turn(tmp_path, tiny):
    shots, ids = selection.few_shot_turns(tiny["splits"], 2)
    assert len(ids) == 2 and [turn["role"] for turn in shots] == ["user", "assistant"] * 2
    prompt = conversation("where is my order", "shipping_status")
    assert selection.with_shots(prompt, shots) == [prompt[0], *shots, *prompt[1:]]

    selected, _ = run(tmp_path, tiny, [tiny["small"], tiny["trained"]], SelectSpec(few_shot=2, metric="loss"))
    stats = read_stats(selected)
    assert stats["rule"]["metric"] == "few_shot_loss" and not stats["rule"]["higher_is_better"]
    assert {"loss", "exact_match", "few_shot_loss", "few_shot_exact_match"} <= set(
        stats["candidates"][0]["metrics"]
    )


def test_a_gguf_candidate_is_dequantized_once_and_scored_as_its_folder(tmp_path, tiny, monkeypatch):
    from test_gguf import write_tiny_gguf

    from tuneline.train import base_model

    gguf_file, _ = write_tiny_gguf(tmp_path)
    resolve = lambda spec: base_model.resolve_base_model(tmp_path / "art", spec)  # noqa: E731 - the task's
    candidates = [tiny["trained"], str(gguf_file)]
    selected, _ = run(tmp_path, tiny, candidates, resolve=resolve)
    trained, gguf_row = read_stats(selected)["candidates"]
    assert gguf_row["name"] == str(gguf_file) and gguf_row["field"] == "model.candidates[1]"
    assert "/stages/base_model/" in gguf_row["model"] and gguf_row["params"] > 0
    assert trained["chosen"] and not gguf_row["chosen"]

    monkeypatch.setattr(base_model, "dequantize_gguf", lambda *args: pytest.fail("dequantized twice"))
    assert run(tmp_path, tiny, candidates, resolve=resolve)[0] == selected


def test_candidates_run_the_recipes_test_suites(tmp_path, tiny):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "system: Label the message.\ncases:\n"
        + "".join(
            f"  - prompt: {qs[0]}\n    assert:\n      - equals: {label}\n" for label, qs in QUESTIONS.items()
        )
        + "  - prompt: be polite\n    assert:\n      - rubric: polite\n"
    )
    evaluate = EVALUATE.model_copy(update={"suites": [str(suite)]})
    model = ModelSpec(name=tiny["small"], candidates=[tiny["small"], tiny["trained"]])
    selected, chosen = selection.run_select(
        tmp_path / "art", tiny["splits"], model, SelectSpec(metric="suite_pass_rate", few_shot=1), evaluate,
        resolve=lambda s: s, train_memory=memory_by_params, echo=lambda _: None,
    )  # fmt: skip
    small, trained = read_stats(selected)["candidates"]
    assert chosen.name == tiny["trained"] and read_stats(selected)["rule"]["metric"] == "suite_pass_rate"
    assert trained["metrics"]["suite_pass_rate"] > small["metrics"]["suite_pass_rate"] == 0.0
    scored = read_stats(
        selection.find_stage(tmp_path / "art", "select_candidate", selected_inputs(selected)[1])
    )
    assert scored["suites"]["by_kind"]["rubric"]["not_run"] == 1 and scored["suites"]["run"] == 3


def selected_inputs(selected):
    return [entry["digest"] for entry in read_manifest(selected)["inputs"]]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("does/not/exist", "model.candidates[1]: cannot load 'does/not/exist'"),
        ("/no/such/folder", "model.candidates[1]: cannot load '/no/such/folder'"),
        ("missing.gguf", "model.candidates[1]: GGUF file 'missing.gguf' does not exist"),
    ],
)
def test_a_bad_candidate_names_its_field_before_any_model_loads(tmp_path, tiny, monkeypatch, name, expected):
    from tuneline.train.base_model import resolve_base_model

    monkeypatch.setattr(models, "load_trained", lambda *a, **kw: pytest.fail("a model loaded"))
    model = ModelSpec(name=tiny["small"], candidates=[tiny["small"], name])
    with pytest.raises(UserError, match="^" + expected.replace("[", r"\[").replace("(", r"\(")):
        selection.run_select(
            tmp_path / "art", tiny["splits"], model, SelectSpec(), EVALUATE,
            resolve=lambda s: resolve_base_model(tmp_path / "art", s), train_memory=memory_by_params,
        )  # fmt: skip


def row(name, value, params, **figures):
    loss = None if value is None else 1 - value
    return {"name": name, "metrics": {"exact_match": value, "loss": loss}, "params": params,
            "train_memory_gb": 1.0, "tokens_per_second": 50.0, "latency_ms": 100.0} | figures  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "select", "metric", "winner", "reason"),
    [
        ([row("a", 0.5, 10), row("b", 0.7, 20)], SelectSpec(), "exact_match", 1, "best exact_match (0.7)"),
        ([row("a", 0.5, 10), row("b", 0.7, 20)], SelectSpec(), "loss", 1, "best loss (0.3)"),
        ([row("a", 0.7, 20), row("b", 0.7, 10)], SelectSpec(), "exact_match", 1, "with a: fewer parameters"),
        ([row("a", 0.5, 10), row("b", 0.7, 20, tokens_per_second=5.0)], SelectSpec(min_tokens_per_second=10),
         "exact_match", 0, "best exact_match (0.5)"),
        ([row("a", 0.5, 10, latency_ms=900.0), row("b", 0.7, 20)], SelectSpec(max_latency_ms=500),
         "exact_match", 1, "best exact_match (0.7)"),
        ([row("a", None, 10), row("b", 0.1, 20)], SelectSpec(), "exact_match", 1, "best exact_match (0.1)"),
    ],
)  # fmt: skip
def test_the_rule_picks_the_best_within_the_budget(rows, select, metric, winner, reason):
    assert selection.choose(rows, select, metric) == winner
    assert reason in rows[winner]["reason"] and [r["chosen"] for r in rows].count(True) == 1


def test_a_speed_budget_says_which_field_to_relax():
    rows = [row("a", 0.5, 10, tokens_per_second=5.0), row("b", 0.7, 20, tokens_per_second=8.0)]
    with pytest.raises(UserError) as error:
        selection.choose(rows, SelectSpec(min_tokens_per_second=10), "exact_match")
    assert "  a: exact_match 0.5, 10 parameters, 1 GiB train memory, 5 tokens/s, 100 ms per reply" in str(
        error.value
    )
    assert "5.0 tokens/s < select.min_tokens_per_second 10.0" in str(error.value)
    assert "relax select.min_tokens_per_second" in str(error.value)


def test_model_name_is_the_first_candidate_unless_listed():
    fields = lambda model: [(f, s.name) for f, s in selection.candidate_specs(model)]  # noqa: E731
    assert fields(ModelSpec(name="m", candidates=["a", "b"])) == [
        ("model.name", "m"), ("model.candidates[0]", "a"), ("model.candidates[1]", "b")
    ]  # fmt: skip
    assert fields(ModelSpec(name="b", candidates=["a", "b"])) == [
        ("model.candidates[0]", "a"),
        ("model.candidates[1]", "b"),
    ]


def test_a_recipe_without_candidates_keeps_its_model_digest():
    data = {"name": "p", "sources": [{"name": "s", "path": "x.jsonl"}], "model": {"name": "m"},
            "register": {"model_name": "p"}}  # fmt: skip
    recipe = validate_recipe(data)
    assert "candidates" not in recipe.model.model_dump()
    assert recipe.select == SelectSpec()
    with_candidates = validate_recipe(data | {"model": {"name": "m", "candidates": ["m", "n"]}})
    assert with_candidates.model.model_dump()["candidates"] == ["m", "n"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"select": {"few_shot": 2}}, "select: set, but model.candidates is empty"),
        ({"model": {"name": "m", "candidates": ["n"]}, "select": {"metric": "schema_match"}},
         "select.metric is schema_match, which needs a JSON Schema: set evaluate.json_schema"),
        ({"model": {"name": "m", "candidates": ["n"]}, "select": {"metric": "bleu"}},
         "select.metric: Input should be"),
    ],
)  # fmt: skip
def test_a_select_section_the_recipe_cannot_use_is_refused(changes, expected):
    data = {"name": "p", "sources": [{"name": "s", "path": "x.jsonl"}], "model": {"name": "m"},
            "register": {"model_name": "p"}}  # fmt: skip
    with pytest.raises(UserError, match=expected):
        validate_recipe(data | changes)


def test_the_flow_trains_the_chosen_candidate(tmp_path, prefect_server):
    from test_flow import recipe_for  # the flow test's recipe: tiny LoRA training, MLflow on SQLite
    from tuneline.flows.finetune import finetune

    from tuneline.models import make_tiny_model

    project = tmp_path
    lines = Path(__file__).resolve().parents[1].joinpath("recipes/data/support_intents.jsonl").read_text()
    texts = lines.splitlines()[:120]
    (project / "tickets.jsonl").write_text("\n".join(texts) + "\n")
    for name, hidden in (("base", 48), ("smaller", 32)):
        make_tiny_model(project / name, texts, vocab_size=300, hidden_size=hidden, num_layers=2, num_heads=4)
    candidates = [str(project / "base"), str(project / "smaller")]
    recipe = recipe_for(project, model={"candidates": candidates}, gate={"min_records": 20},
                        train={"max_steps": 2}, select={"max_examples": 4, "speed_examples": 2})  # fmt: skip
    summary = finetune(recipe)
    stages = summary["stage_dirs"]
    selected = read_stats(StageRef(stage="select", digest="-", path=stages["select"]))
    assert selected["chosen"] == str(project / "smaller")  # both score 0: fewer parameters wins
    adapter = json.loads(Path(stages["train"], "adapter", "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(project / "smaller")
    assert [row["stage"] for row in summary["funnel"]][:6] == [
        "collect",
        "clean",
        "gate",
        "split",
        "select",
        "train",
    ]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=recipe.register.tracking_uri)
    run = client.get_run(selected["mlflow_run_id"])
    assert run.info.run_name == "select-flow-test" and run.data.params["chosen"] == str(project / "smaller")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "select")} >= {"select/candidates.json"}
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(child.data.tags["chosen"] for child in children) == ["false", "true"]
    assert all({"exact_match", "params", "tokens_per_second"} <= set(c.data.metrics) for c in children)
