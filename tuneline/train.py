"""The train stage: LoRA supervised fine-tuning with TRL's SFT trainer, loss on assistant tokens.

Two ways to keep the loss on what the assistant says, picked from the chat template:
- `assistant_only`: the template marks assistant output with `{% generation %}` (the tiny model's
  ChatML does, end-of-turn token included); records train as whole conversations.
- `completion_only`: most hub templates have no markers; each record becomes a conversational
  prompt (every turn before the last assistant turn) and completion (that turn, rendered by the
  template with its end-of-turn token).

The stage folder holds `adapter/` (the LoRA adapter), `model/` (the merged full model and its
tokenizer, loadable with plain AutoModelForCausalLM/AutoTokenizer), `trained.jsonl` (one id per
record trained on) and stats with the loss curve. peft and trl are imported inside the functions
that need them: they cost seconds to import.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from tuneline import methods, models
from tuneline.methods import build_peft_config as build_peft_config  # re-exported for callers
from tuneline.recipe import ModelSpec, TrainSpec
from tuneline.store import (
    StageRef,
    StageWriter,
    code_digest,
    find_stage,
    iter_records,
    stage_digest,
    write_stage,
)

# TRL 1.16 calls transformers' deprecated `is_gradient_checkpointing` on every training step.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

STAGE = "train"
LossMode = Literal["assistant_only", "completion_only"]


def build_sft_config(train: TrainSpec, output_dir: Path, *, loss_mode: LossMode = "assistant_only") -> Any:
    """The recipe's training settings as a `trl.SFTConfig`.

    TRL's defaults suit a GPU (bf16, gradient checkpointing); on CPU both are turned off. Nothing
    is reported to external trackers and no checkpoints are saved: the stage saves the result.
    """
    from trl import SFTConfig

    device, dtype = models.choose_device()
    on_gpu = device == "cuda"
    # transformers 5 renamed gradient_checkpointing (TRL turns it on by default; tiny CPU models
    # only lose speed with it); the old name still works but warns.
    renamed = "activation_checkpointing" in SFTConfig.__dataclass_fields__
    checkpointing = {"activation_checkpointing" if renamed else "gradient_checkpointing": False}
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a share of the total steps
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        assistant_only_loss=loss_mode == "assistant_only",
        completion_only_loss=loss_mode == "completion_only",
        use_cpu=not on_gpu,
        bf16=dtype == torch.bfloat16,
        **checkpointing,
        dataloader_pin_memory=on_gpu,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def choose_loss_mode(tokenizer: Any) -> LossMode:
    """`assistant_only` when the chat template has `{% generation %}` markers, else `completion_only`."""
    return "assistant_only" if models.has_generation_markers(tokenizer.chat_template) else "completion_only"


def prompt_length(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    """Tokens of the turns before an assistant reply, generation prompt included."""
    return len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def make_training_rows(
    records: list[dict[str, Any]], tokenizer: Any, loss_mode: LossMode, max_length: int, writer: StageWriter
) -> list[dict[str, Any]]:
    """Training rows for the SFT trainer; records it cannot learn from are dropped with a reason.

    A record without an assistant turn has nothing to learn; one whose prompt alone fills
    `max_length` would be truncated to no trainable token (TRL would silently skip it).
    """
    rows = []
    for record in records:
        messages = [models.clean_message(m) for m in record["messages"]]
        last = models.last_assistant_index(messages)
        if last is None:
            writer.drop(record, "no_assistant_turn", "messages: no assistant turn to learn from")
            continue
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_end = first if loss_mode == "assistant_only" else last
        length = prompt_length(tokenizer, messages[:prompt_end]) if prompt_end else 0
        if length >= max_length:
            writer.drop(
                record,
                "prompt_exceeds_max_length",
                f"prompt is {length} tokens, train.max_length is {max_length}; raise train.max_length",
            )
            continue
        if loss_mode == "assistant_only":
            rows.append({"messages": messages})
        else:
            rows.append({"prompt": messages[:last], "completion": [messages[last]]})
        writer.keep({"id": record["id"]}, "trained.jsonl")
    return rows


def summarize_log_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss curve: one (step, loss, learning_rate) row per logging step."""
    return [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in history
        if "loss" in entry
    ]


def run_train(artifacts_dir: str | Path, splits: StageRef, model: ModelSpec, train: TrainSpec) -> StageRef:
    """Fine-tune the base model on the train split with LoRA; cached on recipe, data and code digests."""
    digest = stage_digest(
        STAGE, model, train, splits.digest, code_digest(__file__, models.__file__, methods.__file__)
    )
    cached = find_stage(artifacts_dir, STAGE, digest)
    if cached:
        return cached
    from transformers import set_seed
    from trl import SFTTrainer

    records = list(iter_records(splits, "train.jsonl"))
    with write_stage(artifacts_dir, STAGE, digest, [splits]) as writer:
        writer.count_in(len(records))
        tokenizer = models.load_tokenizer(model)
        loss_mode = choose_loss_mode(tokenizer)
        rows = make_training_rows(records, tokenizer, loss_mode, train.max_length, writer)
        if not rows:
            raise ValueError(
                f"splits {splits.path}: no trainable record among {len(records)} in train.jsonl "
                "(see the train stage's rejects); check the data or raise train.max_length"
            )
        set_seed(train.seed)
        prepared = methods.prepare_model(model, train)  # frozen or peft-wrapped as the method says
        args = build_sft_config(train, writer.path("checkpoints"), loss_mode=loss_mode)
        trainer = SFTTrainer(
            model=prepared.model,
            args=args,
            optimizers=(methods.build_optimizer(prepared.model, train, args, prepared), None),
            train_dataset=_to_dataset(rows),
            processing_class=tokenizer,
            callbacks=methods.method_callbacks(train, prepared),
        )
        trainable, total = methods.count_parameters(prepared)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
        methods.export_model(trainer.model, tokenizer, writer.dir, model, train)
        writer.stats = _train_stats(trainer, result, loss_mode, trainable, total, seconds, len(rows))
        writer.stats["method"] = prepared.method
        _remove_dir(writer.path("checkpoints"))
    return find_stage(artifacts_dir, STAGE, digest)


def _to_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def _train_stats(
    trainer: Any, result: Any, loss_mode: LossMode, trainable: int, total: int, seconds: float, examples: int
) -> dict[str, Any]:
    history = trainer.state.log_history
    tokens = max((entry.get("num_tokens", 0) for entry in history), default=0)
    train_loss = result.training_loss
    return {
        "loss_mode": loss_mode,
        "examples": examples,
        "trainable_params": trainable,
        "total_params": total,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        "seconds": round(seconds, 2),
        "tokens": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1) if tokens and seconds else None,
        "device": str(trainer.model.device),
        "log_history": summarize_log_history(history),
    }


def _remove_dir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
