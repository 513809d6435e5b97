"""The recipe's `pretrain` section: continued pre-training (ULMFiT's target-LM fine-tuning,
LLaMA-Factory's `pt` stage) before `train`. Re-exported by tuneline.recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneline.recipe.section import Section


class PretrainSpec(Section):
    """Plain causal-LM training of every weight of the base on documents packed into blocks; the
    `train` stage then fine-tunes the result instead of the base."""

    include_records: bool = Field(
        False,
        description="Also train on the user and assistant text of the train split's records (never "
        "validation or test); what a recipe without documents (no crawl, no text files) trains on.",
    )
    block_size: int = Field(
        128, ge=8, description="Tokens per block: texts are joined (end-of-text token between) and cut."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the blocks.")
    max_steps: int = Field(-1, description="Stop after this many steps; -1 trains for `epochs`.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Blocks per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches summed into one step.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="Learning-rate schedule after the warmup.")
    seed: int = Field(0, description="Seed of dropout and block order.")
    logging_steps: int = Field(10, ge=1, description="Log loss and pace every N steps.")
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps; a killed run resumes from it.")
