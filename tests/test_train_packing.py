"""Packing without a varlen attention kernel (tuneline/train/packing.py): rows of packed bins.

Several examples share each row; each must see only itself (its logits and loss equal those of
the example alone), the loss must fall on the reply tokens only, and the train stage must train
with it and count only real tokens.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from train_fixtures import QUESTIONS, conversation, make_split_and_model, small_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline import models
from tuneline.records import make_record
from tuneline.store import read_stats
from tuneline.train import stage as train
from tuneline.train.packing import PackedRowsTrainer, has_varlen_attention
from tuneline.train.sft_data import choose_loss_mode, training_row

# ~40 tokens per conversation: bins of 160 tokens hold three or four of them.
MAX_LENGTH = 160
# ChatML without {% generation %} markers: completion-only loss on prompt/completion rows.
PLAIN_CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [conversation(q, label) for label, qs in QUESTIONS.items() for q in qs]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    splits, model = make_split_and_model(root)
    return {"root": root, "splits": splits, "model": model}


def packed_trainer(base_dir, out_dir, attn: str = "sdpa", chat_template: str | None = None):
    """A `PackedRowsTrainer` over the labelling conversations, with Tuneline's SFT settings."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if chat_template:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation=attn)
    loss_mode = choose_loss_mode(tokenizer)
    rows = [training_row(make_record(c), tokenizer, loss_mode, MAX_LENGTH)[0] for c in CONVERSATIONS]
    spec = small_spec(packing=True, max_length=MAX_LENGTH, batch_size=2)
    args = train.build_sft_config(spec, out_dir, loss_mode=loss_mode)
    trainer = PackedRowsTrainer(
        model=model, args=args, train_dataset=train._to_dataset(rows), processing_class=tokenizer
    )
    return trainer, tokenizer


def example_spans(batch: dict, row: int) -> list[tuple[int, int]]:
    """(start, end) of each example in a row: position ids restart at 0, padding follows."""
    real = int(batch["attention_mask"][row].sum())
    starts = [i for i in range(real) if batch["position_ids"][row, i] == 0]
    return list(zip(starts, [*starts[1:], real], strict=True))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny, tmp_path, attn):
    trainer, _ = packed_trainer(tiny["model"].name, tmp_path, attn)
    batch = next(iter(trainer.get_train_dataloader()))
    spans = [example_spans(batch, row) for row in range(len(batch["input_ids"]))]
    assert len(spans) == 2 and all(len(row) >= 2 for row in spans)  # several examples per row
    assert (batch["attention_mask"] == 0).any()  # and a padded row
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        leaky = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}).logits
        nll, counted, worst, worst_leaky = 0.0, 0, 0.0, 0.0
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
                alone = model(input_ids=batch["input_ids"][row : row + 1, start:end]).logits[0]
                worst = max(worst, (alone - packed[row, start:end]).abs().max().item())
                worst_leaky = max(worst_leaky, (alone - leaky[row, start:end]).abs().max().item())
                labels = batch["labels"][row, start:end]
                targets = labels[1:] != -100
                log_probs = alone[:-1].log_softmax(-1)[targets].gather(1, labels[1:][targets, None])
                nll -= log_probs.sum().item()
                counted += int(targets.sum())
        # The trainer's own loss (the model called without the 2D mask) is the alone examples' loss.
        loss = trainer.compute_loss(model, dict(batch)).item()
    assert worst < 1e-4
    assert worst_leaky > 1e-2  # with the 2D mask the examples would see each other: the check bites
    assert loss == pytest.approx(nll / counted, rel=1e-4)


@pytest.mark.parametrize("template", [None, PLAIN_CHATML], ids=["assistant_only", "completion_only"])
def test_packed_labels_cover_only_the_replies(tiny, tmp_path, template):
    trainer, tokenizer = packed_trainer(tiny["model"].name, tmp_path, chat_template=template)
    replies = []
    for batch in trainer.get_train_dataloader():
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding
        for row in range(len(batch["input_ids"])):
            for start, end in example_spans(batch, row):
                labels = batch["labels"][row, start:end]
                replies.append(tokenizer.decode(labels[labels != -100]))
    expected = [f"{c[-1]['content']}<|im_end|>" for c in CONVERSATIONS]
    assert sorted(reply.strip() for reply in replies) == sorted(expected)


def test_varlen_kernels_keep_trl_padding_free_packing():
    def model_with(attn: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))

    assert has_varlen_attention(model_with("flash_attention_2"))
    assert has_varlen_attention(model_with("flash_attention_3"))
    assert not has_varlen_attention(model_with("sdpa"))
    assert not has_varlen_attention(model_with("eager"))


def test_packed_train_stage_trains_and_counts_real_tokens(tiny):
    spec = small_spec(packing=True, max_length=MAX_LENGTH, batch_size=2, max_steps=-1, epochs=1)
    stats = read_stats(train.run_train(tiny["root"] / "art", tiny["splits"], tiny["model"], spec))
    assert math.isfinite(stats["train_loss"]) and stats["steps"] >= 1
    tokenizer = models.load_tokenizer(tiny["model"])
    records = [make_record(conversation(q, label)) for label, qs in QUESTIONS.items() for q in qs]
    trained = [r for index, r in enumerate(records) if index % 4 != 3]  # the split's train records
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in trained
    ]
    assert stats["tokens"] == sum(lengths)  # one epoch of real tokens, no padding
