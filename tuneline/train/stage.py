"""The train stage: supervised fine-tuning with TRL's SFT trainer, loss on assistant tokens only.

The method (full, freeze, LoRA, QLoRA, soft prompts) comes from tuneline/train/methods.py, the rows
and the validation metric from tuneline/train/sft_data.py. This module runs the training safely:
- checkpoints every `save_steps` go to `checkpoint_dir` (keyed by the stage digest, outside the
  stage's temporary folder), so the same recipe run again after a crash resumes from the last
  complete checkpoint; the folder is removed once the stage is written (so the trainer's extra
  checkpoint at the last step is skipped: `SkipFinalCheckpoint`);
- with `train.distributed`, `accelerate launch` workers (tuneline/train/worker.py) run `train_here`;
- a `TrackingCallback` writes `train.log` and, given a tracking target, an MLflow run.

The stage folder holds `adapter/` and/or `model/` (tuneline/train/export.py), `trained.jsonl` (one id
per record trained on), `train.log`, `loss_curve.png` and stats with the loss curve. peft and trl
are imported inside the functions that need them: they cost seconds to import.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tuneline import models
from tuneline.experiment import TrackingTarget
from tuneline.objectstore import download_checkpoint, remove_checkpoints
from tuneline.pipeline import TRAIN, train_key
from tuneline.recipe import ModelSpec, TrainSpec
from tuneline.store import StageRef, StageWriter, find_stage, iter_records, stage_lock, write_stage
from tuneline.train import export, launch, layout, methods
from tuneline.train import tracking as tracking_lib
from tuneline.train.checkpoints import checkpoint_callbacks
from tuneline.train.methods import build_peft_config as build_peft_config  # re-exported for callers
from tuneline.train.sft_data import (
    ExactMatchCallback,
    LossMode,
    TrainDataError,
    choose_loss_mode,
    make_training_rows,
    validation_conversations,
    with_reasoning,
)
from tuneline.train.tracking import TrackingCallback

# TRL 1.16 calls transformers' deprecated `is_gradient_checkpointing` on every training step.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def build_sft_config(
    train: TrainSpec, output_dir: Path, *, loss_mode: LossMode = "assistant_only", evaluate: bool = False
) -> Any:
    """The recipe's training settings as a `trl.SFTConfig`.

    bf16 only where the device has it; activation checkpointing only when the recipe asks
    (TRL turns it on by default; it costs tiny CPU models speed and saves them nothing).
    Checkpoints go to `output_dir` every `save_steps`. With `evaluate`, the validation split is
    scored every `eval_steps` and the best checkpoint by `eval_metric` is the result. Trackers are
    off here: Tuneline's own callback logs to MLflow.
    """
    from trl import SFTConfig

    device, dtype = models.choose_device()
    on_gpu = device == "cuda"
    # transformers 5 renamed gradient_checkpointing; the old name still works but warns.
    # Non-reentrant checkpointing works with frozen embeddings (peft) without input grads.
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in SFTConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    checkpointing = {name: train.activation_checkpointing}
    if train.activation_checkpointing:
        checkpointing[f"{name}_kwargs"] = {"use_reentrant": False}
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        packing=train.packing,  # best-fit-decreasing bins; rows of them without a varlen kernel (train_here)
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
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_steps if evaluate else None,
        load_best_model_at_end=evaluate,
        metric_for_best_model=f"eval_{train.eval_metric}" if evaluate else None,
        greater_is_better=train.eval_metric != "loss" if evaluate else None,
        report_to="none",
        disable_tqdm=True,
    )


class SkipFinalCheckpoint(TrainerCallback):
    """No checkpoint at the last step unless one is due there anyway.

    The trainer saves one at the end whatever `save_steps` says; the stage exports the model right
    after and removes the checkpoints, so it is pure cost: 4% of a short LoRA run on CPU, and for
    a full fine-tune the weights and AdamW state (~12 bytes a parameter: ~84 GB for 7B). A run
    killed while exporting resumes from the last checkpoint that was due. Not used with
    evaluation: the best checkpoint can be the last one.
    """

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps and state.global_step % (state.save_steps or args.save_steps):
            control.should_save = False


def summarize_log_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss curve: one (step, loss, learning_rate) row per logging step."""
    return [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in history
        if "loss" in entry
    ]


def summarize_eval_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation curve: one (step, eval_loss, eval_exact_match) row per evaluation."""
    return [
        {
            "step": entry["step"],
            "eval_loss": entry["eval_loss"],
            "eval_exact_match": entry.get("eval_exact_match"),
        }
        for entry in history
        if "eval_loss" in entry
    ]


def checkpoint_dir(artifacts_dir: str | Path, digest: str, stage: str = TRAIN.name) -> Path:
    """Where a training (of the train or pretrain `stage`) keeps its checkpoints and log until its
    stage is written.

    Outside the stage's temporary folder (renamed away when the stage is written), keyed by the
    stage digest, so a killed run's checkpoints are found again by the same recipe.
    """
    return Path(artifacts_dir) / "checkpoints" / stage / digest


def last_complete_checkpoint(work_dir: Path, *, remove_partial: bool = True) -> Path | None:
    """The newest `checkpoint-N` whose trainer state was written (it is written last); newer,
    half-written checkpoints of a killed process are removed (by the main process only)."""
    found = sorted(
        (int(path.name.removeprefix("checkpoint-")), path)
        for path in work_dir.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit()
    )
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        except (OSError, ValueError, KeyError):
            if remove_partial:
                _remove_dir(path)
            continue
        return path
    return None


def run_train(
    artifacts_dir: str | Path,
    splits: StageRef,
    model: ModelSpec,
    train: TrainSpec,
    *,
    tracking: TrackingTarget | None = None,
    echo: Callable[[str], None] | None = None,
    pretrained: StageRef | None = None,
) -> StageRef:
    """Fine-tune the base model on the train split; cached on recipe, data and code digests.

    A run killed mid-training resumes from its last complete checkpoint when called again with
    the same inputs (`train.resume: auto`). With `train.distributed`, `accelerate launch` workers
    train and this process waits (their output goes to `echo`). With `tracking`, the training
    is an MLflow run whose id lands in the stage's stats. With `pretrained` (a pretrain stage),
    training starts from its model instead of the base, and the digest covers it.
    """
    digest = train_key(model, train, splits, pretrained)
    if pretrained is not None:
        model = model.model_copy(update={"name": str(pretrained.file("model")), "revision": None})
    if cached := find_stage(artifacts_dir, TRAIN.name, digest):
        return cached
    # The main node's launcher holds the stage lock for its workers, which write without it.
    main_node = train.distributed.node_rank == 0
    with stage_lock(artifacts_dir, TRAIN.name, digest) if main_node else nullcontext():
        if cached := find_stage(artifacts_dir, TRAIN.name, digest):  # written while this run waited
            return cached
        return _train_unlocked(artifacts_dir, splits, model, train, digest, tracking, echo)


def _train_unlocked(
    artifacts_dir: str | Path,
    splits: StageRef,
    model: ModelSpec,
    train: TrainSpec,
    digest: str,
    tracking: TrackingTarget | None,
    echo: Callable[[str], None] | None,
) -> StageRef:
    work_dir = checkpoint_dir(artifacts_dir, digest)
    main_node = train.distributed.node_rank == 0
    if train.resume == "fresh" and main_node:
        _remove_dir(work_dir)
    elif train.resume == "fresh":  # another node: its own old checkpoints, not node 0's launch files
        for old in work_dir.glob("checkpoint-*"):  # on a shared disk (node 0 removes them too)
            _remove_dir(old)
    elif last_complete_checkpoint(work_dir, remove_partial=False) is None:
        download_checkpoint(artifacts_dir, work_dir)  # uploaded by a run on another machine, if any
    if not launch.needs_launch(train.distributed):
        ref = train_here(artifacts_dir, splits, model, train, digest=digest, tracking=tracking, echo=echo)
    else:
        request = launch.LaunchRequest(
            artifacts_dir=str(Path(artifacts_dir).resolve()),
            splits=splits,
            model=model,
            train=train,
            digest=digest,
            tracking=tracking,
        )
        launch_dir = launch.node_dir(work_dir, train.distributed)
        launch.launch_training(request, train.distributed, launch_dir, echo)
        ref = find_stage(artifacts_dir, TRAIN.name, digest)
        if ref is None and main_node:
            raise launch.LaunchError(
                f"train.distributed: the workers exited without writing the train stage {digest}; "
                f"see {launch_dir / launch.LOG_FILE}"
            )
        if ref is None:
            ref = launch.wait_for_main_node(artifacts_dir, digest, train.distributed, echo)
        _remove_dir(launch_dir)
    if main_node:
        _remove_dir(work_dir)
        remove_checkpoints(artifacts_dir, work_dir)  # the uploaded ones, with an object store
    else:  # on a disk shared with the main node the checkpoints are its to remove
        with suppress(OSError):
            work_dir.rmdir()
    return ref


def train_here(
    artifacts_dir: str | Path,
    splits: StageRef,
    model: ModelSpec,
    train: TrainSpec,
    *,
    digest: str,
    tracking: TrackingTarget | None = None,
    echo: Callable[[str], None] | None = None,
) -> StageRef | None:
    """Train in this process (alone, or as one rank of a launched run); the main process writes
    the stage and returns it, other ranks return None. `echo` hears where training starts (a
    resumed run: "training resumed from step N") and ends.

    Checkpoints go to `checkpoint_dir`; the last complete one found there is resumed from.
    """
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTTrainer

    from tuneline.train.packing import PackedRowsTrainer, has_varlen_attention

    main = _is_main_process()
    work_dir = checkpoint_dir(artifacts_dir, digest)
    records = list(iter_records(splits, "train.jsonl"))
    with _stage_writer(artifacts_dir, digest, splits, main) as writer:
        writer.count_in(len(records))
        tokenizer = models.load_tokenizer(model)
        loss_mode = choose_loss_mode(tokenizer)
        records = [with_reasoning(record, tokenizer, train.reasoning) for record in records]
        rows = make_training_rows(records, tokenizer, loss_mode, train.max_length, writer)
        if not rows:
            raise TrainDataError(
                f"splits {splits.path}: no trainable record among {len(records)} in train.jsonl "
                "(see the train stage's rejects); check the data or raise train.max_length"
            )
        evaluate = train.eval_steps is not None
        validation = validation_conversations(splits, tokenizer, loss_mode, train) if evaluate else []
        work_dir.mkdir(parents=True, exist_ok=True)
        resume_from = last_complete_checkpoint(work_dir, remove_partial=main)
        tracker = TrackingCallback(work_dir / layout.LOG_FILE, tracking, echo=echo)
        callbacks: list[Any] = [tracker]
        if evaluate:
            # Before early stopping, which reads the metric this callback adds.
            callbacks.insert(0, ExactMatchCallback(tokenizer, validation, train))
            if train.early_stopping_patience:
                callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
        else:
            callbacks.append(SkipFinalCheckpoint())
        set_seed(train.seed)
        prepared = methods.prepare_model(model, train)  # frozen or peft-wrapped as the method says
        args = build_sft_config(train, work_dir, loss_mode=loss_mode, evaluate=evaluate)
        callbacks += methods.method_callbacks(train, prepared)
        callbacks += checkpoint_callbacks(artifacts_dir)  # uploaded when due, with an object store
        # TRL's packing flattens a batch into one sequence: cheap with a varlen (flash) kernel only;
        # otherwise each packed bin stays its own row (tuneline/train/packing.py).
        rows_of_bins = train.packing and not has_varlen_attention(prepared.model)
        trainer = (PackedRowsTrainer if rows_of_bins else SFTTrainer)(
            model=prepared.model,
            args=args,
            optimizers=(methods.build_optimizer(prepared.model, train, args, prepared), None),
            train_dataset=_to_dataset(rows),
            eval_dataset=_to_dataset([row for row, _ in validation]) if evaluate else None,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        # With tqdm off, transformers prints each raw log dict; the tracker's one line replaces it.
        trainer.remove_callback(PrinterCallback)
        continue_token_count(trainer, resume_from)
        trainable, total = methods.count_parameters(prepared)
        run_id = tracking_lib.open_run(tracking, Path(artifacts_dir), work_dir) if tracking and main else None
        tracker.run_id = run_id
        started = time.perf_counter()
        try:
            if run_id:
                config = tracking_lib.resolved_config(trainer, prepared.method, loss_mode)
                tracking_lib.log_params(tracking, run_id, config)
            gc.collect()
            gc.freeze()  # what is loaded by now lives all run: the collector's full passes skip it
            try:
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            finally:
                gc.unfreeze()
        except BaseException:
            if run_id:  # not left RUNNING; a re-run that resumes reopens it
                tracking_lib.fail_run(tracking, run_id)
            raise
        seconds = time.perf_counter() - started
        if not main:
            return None
        export.export_model(trainer.model, tokenizer, writer.dir, model, train)
        shutil.copyfile(work_dir / layout.LOG_FILE, writer.path(layout.LOG_FILE))
        curve = tracking_lib.plot_loss_curve(trainer.state.log_history, writer.path(layout.CURVE_FILE))
        resumed_step = _step_of(resume_from) or 0
        figures = _train_stats(trainer, result, resumed_step, loss_mode, trainable, total, seconds, len(rows))
        writer.stats = figures | {
            "method": prepared.method,
            "processes": trainer.args.world_size,
            "resumed_from_step": _step_of(resume_from),
            "steps_run": tracker.steps_run,
            "tokens_per_second": _rounded(tracker.tokens_per_second()),
            "validation_examples": len(validation),
            "best_checkpoint_step": _step_of(trainer.state.best_model_checkpoint),
            "best_metric": trainer.state.best_metric,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking.tracking_uri if tracking else None,
        }
        if run_id:
            files = [writer.path(layout.LOG_FILE), *([curve] if curve else [])]
            tracking_lib.finish_run(tracking, run_id, files, writer.stats)
    return find_stage(artifacts_dir, TRAIN.name, digest)


def _to_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def continue_token_count(trainer: Any, checkpoint: Path | None) -> None:
    """Let a resumed trainer count tokens on from its checkpoint's count.

    TRL keeps the count of trained tokens (logged as `num_tokens`) in the trainer, not in its
    checkpointed state, and starts it at 0 in every process; the checkpoint's log history holds
    the count at its step (checkpoint steps are logging steps: tuneline/train/tracking.py).
    """
    if checkpoint is None:
        return
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    tokens = tracking_lib.last_logged(state.get("log_history", []), "num_tokens")
    if tokens is not None:
        trainer._total_train_tokens = int(tokens)  # TRL 1.16's counter; tests/test_train_resume.py checks it


def whole_run_loss(history: list[dict[str, Any]], resumed_step: int, loss_since: float, steps: int) -> float:
    """The mean loss per step over the whole training.

    `trainer.train()` averages over the steps run by its own process only (`loss_since`, from
    `resumed_step` to `steps`); the steps before a resume are in the checkpoint's log history,
    each logged loss the mean over the steps since the previous log.
    """
    total, covered = 0.0, 0
    for entry in history:
        if "loss" in entry and entry["step"] <= resumed_step:
            total += entry["loss"] * (entry["step"] - covered)
            covered = entry["step"]
    run_here = steps - resumed_step
    return (total + loss_since * run_here) / max(covered + run_here, 1)


def _train_stats(
    trainer: Any,
    result: Any,
    resumed_step: int,
    loss_mode: LossMode,
    trainable: int,
    total: int,
    seconds: float,
    examples: int,
) -> dict[str, Any]:
    """The stage's figures for the whole training, a resumed one included (`resumed_step` > 0)."""
    history = trainer.state.log_history
    tokens = tracking_lib.last_logged(history, "num_tokens") or 0
    train_loss = whole_run_loss(history, resumed_step, result.training_loss, trainer.state.global_step)
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
        "eval_history": summarize_eval_history(history),
    }


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun sets RANK in each worker), or a lone process."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _stage_writer(
    artifacts_dir: str | Path, digest: str, splits: StageRef, main: bool
) -> Iterator[StageWriter]:
    """The stage writer on the main process; elsewhere a throwaway one (other ranks write nothing).

    Without the stage lock: `run_train` holds it, in this process or as the workers' launcher.
    """
    if main:
        with write_stage(artifacts_dir, TRAIN.name, digest, [splits], lock=False) as writer:
            yield writer
        return
    scratch = Path(tempfile.mkdtemp(prefix="tuneline-rank-"))
    try:
        yield StageWriter(scratch, TRAIN.name, digest, [splits])
    finally:
        _remove_dir(scratch)


def _step_of(checkpoint: str | Path | None) -> int | None:
    """N of a `checkpoint-N` folder, or None."""
    return int(Path(checkpoint).name.removeprefix("checkpoint-")) if checkpoint else None


def _rounded(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None
