"""The train stage on a tiny local model: a few LoRA steps, the saved adapter and merged model."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import conversation
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline import models
from tuneline.pipeline import train_key
from tuneline.recipe import LoraSpec, ModelSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import (
    check_ledger,
    find_stage,
    iter_records,
    read_manifest,
    read_stats,
    sha256_file,
    write_stage,
)
from tuneline.train import sft_data as train_data
from tuneline.train import stage as train
from tuneline.train import tracking

QUESTIONS = {
    "refund": ["I want my money back", "refund the lamp please", "can I get a refund"],
    "shipping_status": ["where is my order", "my parcel has not arrived", "track order 12"],
    "cancel_order": ["cancel order 7", "stop my order please", "I do not want the order"],
}
# ChatML without {% generation %} markers, as most hub templates: training falls back to
# prompt/completion data with completion-only loss.
PLAIN_CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    records = [make_record(conversation(q, label)) for label, qs in QUESTIONS.items() for q in qs]
    no_reply = {"id": "no-reply", "messages": conversation("hello", "x")[:2], "tools": None, "meta": {}}
    too_long = make_record(conversation("where is my order " * 40, "shipping_status"))
    weighted = make_record(weighted_conversation(0, 1))  # OpenAI's weight: learn the second turn only
    unweighted = make_record(weighted_conversation(0, 0))  # nothing to learn
    with write_stage(root / "art", "split", "s0") as writer:
        for record in [*records, weighted, unweighted, no_reply, too_long]:
            writer.count_in()
            writer.keep(record, "train.jsonl")
        for record in records[:4]:
            writer.count_in()
            writer.keep(record, "validation.jsonl")
    splits = find_stage(root / "art", "split", "s0")
    corpus = [m["content"] for r in records for m in r["messages"]]
    base_dir = models.make_tiny_model(
        root / "base", corpus, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    base_sha = sha256_file(base_dir / "model.safetensors")
    spec = TrainSpec(
        lora=LoraSpec(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]),
        max_steps=3,
        learning_rate=1e-2,
        batch_size=4,
        max_length=64,
        logging_steps=1,
    )
    model_spec = ModelSpec(name=str(base_dir))
    ref = train.run_train(root / "art", splits, model_spec, spec)
    return {
        "root": root,
        "splits": splits,
        "base_dir": base_dir,
        "base_sha": base_sha,
        "spec": spec,
        "model": model_spec,
        "ref": ref,
        "records": records,
        "weighted": weighted,
    }


def weighted_conversation(first: int, second: int) -> list[dict]:
    """Two assistant turns with OpenAI's per-message weight: a wrong label, then the right one."""
    return [
        {"role": "user", "content": "can I get a refund"},
        {"role": "assistant", "content": "cancel_order", "weight": first},
        {"role": "user", "content": "I want my money back"},
        {"role": "assistant", "content": "refund", "weight": second},
    ]


def test_loss_is_finite_and_logged(setup):
    stats = read_stats(setup["ref"])
    assert stats["loss_mode"] == "assistant_only"
    assert stats["steps"] == 3 and stats["method"]["name"] == "lora"
    assert math.isfinite(stats["train_loss"])
    assert [row["step"] for row in stats["log_history"]] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in stats["log_history"])
    assert 0 < stats["trainable_params"] < stats["total_params"]
    assert stats["device"] in ("cpu", "cuda:0")


def test_ledger_holds_with_reasons(setup):
    ledger = check_ledger(setup["ref"])
    assert ledger == {
        "in": len(setup["records"]) + 4,
        "out": len(setup["records"]) + 1,
        "dropped": {"no_assistant_turn": 1, "nothing_to_learn": 1, "prompt_exceeds_max_length": 1},
    }
    trained = {row["id"] for row in iter_records(setup["ref"], "trained.jsonl")}
    assert trained == {r["id"] for r in [*setup["records"], setup["weighted"]]}
    rejects = [json.loads(line) for line in setup["ref"].file("rejects.jsonl").read_text().splitlines()]
    assert sorted(reject["reason"] for reject in rejects) == [
        "no_assistant_turn",
        "nothing_to_learn",
        "prompt_exceeds_max_length",
    ]
    [nothing] = [reject for reject in rejects if reject["reason"] == "nothing_to_learn"]
    assert (
        nothing["detail"] == "every assistant turn has weight 0 (messages[1], messages[3]); nothing to learn"
    )


def test_a_turn_with_weight_0_has_no_loss_and_the_next_turn_has(setup, tmp_path):
    from trl import SFTTrainer

    tokenizer = models.load_tokenizer(setup["model"])
    record = {"messages": weighted_conversation(0, 1)}
    row, reason, _ = train_data.training_row(record, tokenizer, "assistant_only", 64)
    assert reason == ""
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(setup["base_dir"]),
        args=train.build_sft_config(setup["spec"], tmp_path),
        train_dataset=train._to_dataset([row]),
        processing_class=tokenizer,
    )
    example = trainer.train_dataset[0]
    learned = [
        token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100
    ]
    assert tokenizer.decode(learned) == "refund<|im_end|>"
    # Without the weight both answers are learned, as before.
    record["messages"][1].pop("weight")
    row, _, _ = train_data.training_row(record, tokenizer, "assistant_only", 64)
    spans = train_data.mask_spans(row["assistant_masks"])
    assert [tokenizer.decode(row["input_ids"][start:end]) for start, end in spans] == [
        "cancel_order<|im_end|>",
        "refund<|im_end|>",
    ]


def test_a_template_marking_no_assistant_token_drops_the_record_with_the_reason(setup):
    tokenizer = models.load_tokenizer(setup["model"])
    tokenizer.chat_template = PLAIN_CHATML + "{% generation %}{% endgeneration %}"
    row, reason, detail = train_data.training_row(
        {"messages": weighted_conversation(1, 1)}, tokenizer, "assistant_only", 64
    )
    assert (row, reason) == (None, "no_assistant_tokens") and "{% generation %}" in detail


def test_completion_only_learns_the_last_turn_with_weight(setup):
    tokenizer = models.load_tokenizer(setup["model"].model_copy(update={"chat_template": PLAIN_CHATML}))
    row, _, _ = train_data.training_row(
        {"messages": weighted_conversation(1, 0)}, tokenizer, "completion_only", 64
    )
    assert row["completion"] == [{"role": "assistant", "content": "cancel_order"}]
    assert [m["content"] for m in row["prompt"]] == ["can I get a refund"]


def test_lora_weights_trained_and_base_untouched(setup):
    adapter = load_file(setup["ref"].file("adapter") / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # LoRA B starts at zero
    assert any("lm_head" in name for name in adapter)  # modules_to_save travel with the adapter
    assert sha256_file(setup["base_dir"] / "model.safetensors") == setup["base_sha"]
    base = AutoModelForCausalLM.from_pretrained(setup["base_dir"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(setup["ref"].file("model")).state_dict()
    assert not torch.equal(base["lm_head.weight"], merged["lm_head.weight"])
    assert torch.equal(base["model.norm.weight"], merged["model.norm.weight"])  # not a LoRA target


def test_merged_model_matches_peft_model(setup):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(setup["base_dir"])
    peft_model = PeftModel.from_pretrained(base, setup["ref"].file("adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(setup["ref"].file("model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["ref"].file("model"))
    text = tokenizer.apply_chat_template(conversation("where is my order", "shipping_status"), tokenize=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(setup["base_dir"]).chat_template


def test_second_call_is_cached(setup):
    manifest = read_manifest(setup["ref"])
    again = train.run_train(setup["root"] / "art", setup["splits"], setup["model"], setup["spec"])
    assert again == setup["ref"]
    assert read_manifest(again)["finished_at"] == manifest["finished_at"]


def test_template_without_markers_trains_on_completions(setup):
    spec = setup["spec"].model_copy(update={"max_steps": 1})
    model_spec = ModelSpec(name=str(setup["base_dir"]), chat_template=PLAIN_CHATML)
    ref = train.run_train(setup["root"] / "art", setup["splits"], model_spec, spec)
    stats = read_stats(ref)
    assert stats["loss_mode"] == "completion_only"
    assert math.isfinite(stats["train_loss"])
    assert AutoTokenizer.from_pretrained(ref.file("model")).chat_template == PLAIN_CHATML


def test_build_peft_config():
    config = train.build_peft_config(
        TrainSpec(lora=LoraSpec(r=8, alpha=16, modules_to_save=["embed_tokens"]))
    )
    assert (config.r, config.lora_alpha, config.task_type) == (8, 16, "CAUSAL_LM")
    assert config.target_modules == "all-linear" and config.modules_to_save == ["embed_tokens"]
    assert train.build_peft_config(TrainSpec()).modules_to_save is None


@pytest.mark.parametrize("loss_mode", ["assistant_only", "completion_only"])
def test_build_sft_config(tmp_path, loss_mode):
    spec = TrainSpec(epochs=2, learning_rate=1e-3, batch_size=4, max_length=96, seed=7, warmup_ratio=0.1)
    config = train.build_sft_config(spec, tmp_path, loss_mode=loss_mode)
    assert config.assistant_only_loss is (loss_mode == "assistant_only")
    assert config.completion_only_loss is (loss_mode == "completion_only")
    assert (config.num_train_epochs, config.learning_rate, config.per_device_train_batch_size) == (2, 1e-3, 4)
    assert (config.max_length, config.seed, config.warmup_steps) == (96, 7, 0.1)
    assert config.report_to in ("none", [], ["none"]) and config.save_strategy == "steps"
    assert (config.save_steps, config.save_total_limit, config.eval_strategy) == (50, 2, "no")
    assert config.gradient_checkpointing is False
    if not torch.cuda.is_available():
        assert config.use_cpu and not config.bf16


def test_checkpoints_are_removed_once_the_stage_is_written(setup):
    assert not train.checkpoint_dir(setup["root"] / "art", setup["ref"].digest).exists()
    assert "training started; 3 steps in all" in setup["ref"].file("train.log").read_text()
    assert setup["ref"].file("loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_keeps_the_best_checkpoint_and_stops_early(setup):
    """Exact match on validation never improves on a barely trained model: patience 1 stops the
    run at the second evaluation, and the first evaluation's checkpoint is the result."""
    spec = setup["spec"].model_copy(
        update={
            "max_steps": 6,
            "eval_steps": 1,
            "save_steps": 1,
            "eval_metric": "exact_match",
            "early_stopping_patience": 1,
            "packing": True,
            "lr_scheduler": "cosine",
            "eval_max_new_tokens": 3,
        }
    )
    ref = train.run_train(setup["root"] / "art", setup["splits"], setup["model"], spec)
    stats = read_stats(ref)
    assert stats["steps"] == 2  # stopped early, not at max_steps 6
    assert stats["best_checkpoint_step"] == 1 and stats["best_metric"] == 0.0
    assert [row["step"] for row in stats["eval_history"]] == [1, 2]
    assert all(
        math.isfinite(row["eval_loss"]) and row["eval_exact_match"] == 0.0 for row in stats["eval_history"]
    )
    assert stats["validation_examples"] == 4


def test_evaluation_without_validation_records_names_the_fix(setup, tmp_path):
    with write_stage(tmp_path, "split", "s1") as writer:
        for record in setup["records"]:
            writer.count_in()
            writer.keep(record, "train.jsonl")
    splits = find_stage(tmp_path, "split", "s1")
    spec = setup["spec"].model_copy(update={"eval_steps": 1, "save_steps": 1})
    with pytest.raises(train.TrainDataError, match="split.validation"):
        train.run_train(tmp_path, splits, setup["model"], spec)


def test_resume_and_launch_coordinates_do_not_change_the_digest(setup):
    spec = setup["spec"]
    moved = spec.model_copy(
        update={"resume": "fresh", "distributed": spec.distributed.model_copy(update={"main_port": 1234})}
    )
    assert train_key(setup["model"], moved, setup["splits"]) == setup["ref"].digest
    longer = spec.model_copy(update={"max_steps": 4})
    assert train_key(setup["model"], longer, setup["splits"]) != setup["ref"].digest


def test_activation_checkpointing_trains_a_lora_adapter_to_the_same_loss(setup):
    """Recomputing activations saves memory, not accuracy: same loss curve, adapter still learns."""
    spec = setup["spec"].model_copy(update={"max_steps": 2, "logging_steps": 1})
    plain = read_stats(train.run_train(setup["root"] / "art-ckpt", setup["splits"], setup["model"], spec))
    checkpointed_spec = spec.model_copy(update={"activation_checkpointing": True})
    config = train.build_sft_config(checkpointed_spec, setup["root"] / "cfg")
    assert config.gradient_checkpointing is True
    ref = train.run_train(setup["root"] / "art-ckpt", setup["splits"], setup["model"], checkpointed_spec)
    checkpointed = read_stats(ref)
    assert checkpointed["steps"] == plain["steps"] == 2
    losses = [row["loss"] for row in checkpointed["log_history"]]
    assert losses == pytest.approx([row["loss"] for row in plain["log_history"]], rel=1e-4)


@pytest.mark.parametrize(("eval_steps", "saved"), [(None, [2]), (1, [2, 3])])
def test_no_checkpoint_at_the_last_step_unless_due_or_evaluating(setup, monkeypatch, eval_steps, saved):
    """The stage exports the model at the end and removes the checkpoints: the trainer's extra
    save at the last step (the optimizer state too) is skipped, except when evaluating, where the
    last step's checkpoint can be the best one."""
    from transformers import Trainer

    steps: list[int] = []
    original = Trainer._save_checkpoint

    def spy(self, model, trial):
        steps.append(self.state.global_step)
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", spy)
    spec = setup["spec"].model_copy(update={"save_steps": 2, "eval_steps": eval_steps})
    stats = read_stats(train.run_train(setup["root"] / "art", setup["splits"], setup["model"], spec))
    assert stats["steps"] == 3 and steps == saved


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Collected(logging.Handler):
    """A handler that is not a console (like Prefect's API log): keeps every message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_fake_training(tmp_path, monkeypatch, terminal: io.StringIO) -> Collected:
    """Three logging steps through the tracking callback with the task's logger as its echo."""
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = logging.getLogger("prefect.task_runs")
    # Only this test's handlers: after a flow ran in this session, Prefect's own (its API log) sit here
    # and report "Logging error" on stderr outside a run.
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", False)
    console, collected = logging.StreamHandler(terminal), Collected()
    for handler in (console, collected):
        logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        callback = tracking.TrackingCallback(tmp_path / "train.log", echo=logger.info)
        state = SimpleNamespace(global_step=0, max_steps=3, is_world_process_zero=True, log_history=[])
        control = SimpleNamespace(should_save=False, should_log=False)
        callback.on_train_begin(None, state, control)
        for step in (1, 2, 3):
            state.global_step = step
            callback.on_step_end(None, state, control)
            callback.on_log(None, state, control, logs={"loss": 2.0 / step, "num_tokens": 100.0 * step})
        callback.on_train_end(None, state, control)
    finally:
        for handler in (console, collected):
            logger.removeHandler(handler)
    return collected


def test_a_terminal_shows_one_progress_bar_and_the_prefect_log_one_line_per_step(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    collected = run_fake_training(tmp_path, monkeypatch, terminal)
    shown = terminal.getvalue()
    assert "training step" not in shown  # no line per step on the console...
    assert "3/3" in shown and "loss 0.6667" in shown and "tokens/s" in shown  # ...one bar instead
    assert "{" not in shown  # no raw log dict
    steps = [line for line in collected.messages if line.startswith("training step")]
    assert len(steps) == 3 and steps[0].startswith("training step 1/3, loss 2, ")
    assert "left" in steps[0]


def test_without_a_terminal_the_console_gets_the_concise_lines(tmp_path, monkeypatch):
    pipe = io.StringIO()  # CI, a pipe, a launched worker
    run_fake_training(tmp_path, monkeypatch, pipe)
    lines = [line for line in pipe.getvalue().splitlines() if line.startswith("training step")]
    assert len(lines) == 3 and "\r" not in pipe.getvalue()
