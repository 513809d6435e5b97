"""The pretrain stage: continued pre-training of the base on documents, before the train stage.

ULMFiT's target-LM fine-tuning, LLaMA-Factory's `pt` stage: plain next-token prediction over the
collect stage's documents (crawled pages, text files) and, with `pretrain.include_records`, the
user and assistant text of the train split's records (never validation or test, so evaluation
stays held out). The texts are joined with the end-of-text token between them and cut into blocks
of `pretrain.block_size` tokens (the tail shorter than a block is left out, as in transformers'
run_clm), then transformers' Trainer trains every weight with DataCollatorForLanguageModeling
(mlm=False). The train stage then fine-tunes the result (`run_train(..., pretrained=ref)`).

Checkpoints, the training log, the MLflow run and the export are the train stage's
(tuneline/train/stage.py, tracking.py, export.py). The stage folder holds `model/`, `pretrained.jsonl`
(one row per text trained on), `rejects.jsonl` (texts left out, with their reason), `train.log`,
`loss_curve.png` and stats; its ledger counts texts: documents plus records in, trained on or dropped.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneline import models
from tuneline.errors import UserError
from tuneline.experiment import TrackingTarget
from tuneline.pipeline import PRETRAIN, pretrain_key
from tuneline.recipe import ModelSpec, PretrainSpec, TrainSpec
from tuneline.store import DOCUMENTS, StageRef, StageWriter, iter_records, reuse_or_write
from tuneline.train import export, layout
from tuneline.train import tracking as tracking_lib
from tuneline.train.stage import (
    SkipFinalCheckpoint,
    checkpoint_dir,
    last_complete_checkpoint,
    summarize_log_history,
    whole_run_loss,
)
from tuneline.train.tracking import TrackingCallback

PRETRAINED = "pretrained.jsonl"  # one row per text trained on
TRAIN_SPLIT = "train.jsonl"


class PretrainDataError(UserError, ValueError):
    """Nothing, or too little, to pretrain on."""


def run_pretrain(
    artifacts_dir: str | Path,
    collected: StageRef,
    splits: StageRef,
    model: ModelSpec,
    pretrain: PretrainSpec,
    *,
    tracking: TrackingTarget | None = None,
    echo: Callable[[str], None] | None = None,
) -> StageRef:
    """Pretrain the base on the documents (and the train split's records if asked); cached on the
    section, the documents' content, the base model and the code. A killed run resumes from its
    last complete checkpoint. With `tracking`, the stage is an MLflow run of its own."""
    records_from = splits if pretrain.include_records else None
    tracking = pretrain_tracking(tracking)
    digest = pretrain_key(model, pretrain, collected, splits)
    work_dir = checkpoint_dir(artifacts_dir, digest, stage=PRETRAIN.name)

    def write(writer: StageWriter) -> None:
        texts = list(collect_texts(collected, records_from, writer))
        _pretrain_into(writer, Path(artifacts_dir), texts, model, pretrain, work_dir, tracking, echo)

    inputs = [collected, *([splits] if records_from else [])]
    ref = reuse_or_write(artifacts_dir, PRETRAIN, digest, write, inputs)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ref


def collect_texts(collected: StageRef, splits: StageRef | None, writer: StageWriter) -> Iterator[str]:
    """The texts to train on, each counted in the ledger: kept, or dropped with its reason."""
    for index, document in enumerate(iter_records(collected, DOCUMENTS)):
        writer.count_in()
        text = document.get("text")
        if not isinstance(text, str) or not text.strip():
            writer.drop(document, "empty_text", "a document without text")
            continue
        writer.keep(
            {"origin": "document", "line": index + 1, "url": document.get("url"), "chars": len(text)},
            PRETRAINED,
        )
        yield text
    for record in iter_records(splits, TRAIN_SPLIT) if splits else ():
        writer.count_in()
        turns = [m for m in record["messages"] if m["role"] in ("user", "assistant")]
        text = "\n".join(m["content"] for m in turns if isinstance(m.get("content"), str))  # not tool calls
        if not text.strip():
            writer.drop(record, "empty_text", "a record without user or assistant text")
            continue
        writer.keep({"origin": "record", "id": record.get("id"), "chars": len(text)}, PRETRAINED)
        yield text


def pack_blocks(texts: list[str], tokenizer: Any, block_size: int) -> tuple[list[list[int]], int]:
    """The texts as one token stream (end-of-text token after each) cut into `block_size` blocks;
    returns the blocks and the number of tokens in the stream."""
    stream = [
        token
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
        for token in (*ids, tokenizer.eos_token_id)
    ]
    return [
        stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)
    ], len(stream)


def build_training_args(pretrain: PretrainSpec, output_dir: Path) -> Any:
    """The section as `transformers.TrainingArguments`: bf16 where the device has it, checkpoints
    every `save_steps` in `output_dir`, no trackers (Tuneline's callback logs to MLflow)."""
    import torch
    from transformers import TrainingArguments

    device, dtype = models.choose_device()
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=pretrain.epochs,
        max_steps=pretrain.max_steps,
        learning_rate=pretrain.learning_rate,
        lr_scheduler_type=pretrain.lr_scheduler,
        per_device_train_batch_size=pretrain.batch_size,
        gradient_accumulation_steps=pretrain.gradient_accumulation_steps,
        warmup_steps=pretrain.warmup_ratio,  # a float below 1 is a share of the total steps
        seed=pretrain.seed,
        data_seed=pretrain.seed,
        logging_steps=pretrain.logging_steps,
        use_cpu=device != "cuda",
        bf16=dtype == torch.bfloat16,
        dataloader_pin_memory=device == "cuda",
        save_strategy="steps",
        save_steps=pretrain.save_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
    )


def _pretrain_into(
    writer: StageWriter,
    artifacts_dir: Path,
    texts: list[str],
    model: ModelSpec,
    pretrain: PretrainSpec,
    work_dir: Path,
    tracking: TrackingTarget | None,
    echo: Callable[[str], None] | None,
) -> None:
    """Train on the packed blocks and write the model, log, curve and stats into the stage."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, set_seed

    tokenizer = models.load_tokenizer(model)
    blocks, tokens = pack_blocks(texts, tokenizer, pretrain.block_size)
    if not blocks:
        raise PretrainDataError(
            f"pretrain: {len(texts)} text(s), {tokens} tokens, not one block of pretrain.block_size "
            f'{pretrain.block_size}; add documents (a .txt/.md file, {{"text": ...}} JSON lines or a '
            "crawl with mode: documents), set "
            "pretrain.include_records: true, or lower pretrain.block_size"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    resume_from = last_complete_checkpoint(work_dir)
    set_seed(pretrain.seed)
    base = models.load_model(
        model.name,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        allow_pickle_weights=model.allow_pickle_weights,
    )
    base.train()
    tracker = TrackingCallback(work_dir / layout.LOG_FILE, tracking, echo=echo)
    trainer = Trainer(
        model=base,
        args=build_training_args(pretrain, work_dir),
        train_dataset=Dataset.from_dict({"input_ids": blocks}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # labels = the inputs
        processing_class=tokenizer,
        callbacks=[tracker, SkipFinalCheckpoint()],
    )
    trainer.remove_callback(PrinterCallback)  # the tracker's one line per logging step replaces it
    run_id = (
        tracking_lib.open_run(tracking, artifacts_dir, work_dir, stage=PRETRAIN.name) if tracking else None
    )
    tracker.run_id = run_id
    started = time.perf_counter()
    try:
        if run_id:
            tracking_lib.log_params(tracking, run_id, pretrain_params(pretrain, len(blocks)))
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if run_id:
            tracking_lib.fail_run(tracking, run_id)
        raise
    seconds = time.perf_counter() - started
    # Every weight trained: exported as train.method full exports (model/ with the tokenizer).
    export.export_model(trainer.model, tokenizer, writer.dir, model, TrainSpec(method="full"))
    shutil.copyfile(work_dir / layout.LOG_FILE, writer.path(layout.LOG_FILE))
    curve = tracking_lib.plot_loss_curve(trainer.state.log_history, writer.path(layout.CURVE_FILE))
    resumed_step = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else 0
    loss = whole_run_loss(
        trainer.state.log_history, resumed_step, result.training_loss, trainer.state.global_step
    )
    trained_tokens = round(len(blocks) * (trainer.state.epoch or 0)) * pretrain.block_size
    writer.stats = {
        "texts": len(texts),
        "blocks": len(blocks),
        "block_size": pretrain.block_size,
        "tokens": tokens,
        "tokens_left_out": tokens - len(blocks) * pretrain.block_size,  # the tail shorter than a block
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": loss if math.isfinite(loss) else None,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(trained_tokens / seconds, 1) if seconds else None,
        "resumed_from_step": resumed_step or None,
        "device": str(trainer.model.device),
        "log_history": summarize_log_history(trainer.state.log_history),
        "mlflow_run_id": run_id,
        "tracking_uri": tracking.tracking_uri if tracking else None,
    }
    if run_id:
        files = [writer.path(layout.LOG_FILE), *([curve] if curve else [])]
        tracking_lib.finish_run(tracking, run_id, files, writer.stats, stage=PRETRAIN.name)


def pretrain_params(pretrain: PretrainSpec, blocks: int) -> dict[str, Any]:
    """The section and the data's shape as MLflow params (`pretrain.*`)."""
    return {f"pretrain.{key}": str(value) for key, value in pretrain.model_dump().items()} | {
        "pretrain.blocks": str(blocks)
    }


def pretrain_tracking(tracking: TrackingTarget | None) -> TrackingTarget | None:
    """The pretrain stage's MLflow run: the train stage's experiment, its run name with `-pretrain`."""
    return dataclasses.replace(tracking, run_name=f"{tracking.run_name}-pretrain") if tracking else None
