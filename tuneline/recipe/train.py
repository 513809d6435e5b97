"""The recipe's `train` section: the method (full, freeze, LoRA, QLoRA, soft prompts), SFT settings,
evaluation while training, checkpoints and several processes. Re-exported by tuneline.recipe."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from tuneline.recipe.section import Section


class LoraSpec(Section):
    """LoRA adapter settings (peft.LoraConfig)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter, e.g. embed_tokens and lm_head.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r), not alpha/r.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): better at low rank, slower steps.")


class FreezeSpec(Section):
    """Freeze tuning: only the top decoder layers and the named modules train, in full."""

    trainable_layers: int = Field(2, ge=0, description="Top N decoder layers that train.")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Regexes of parameter names that train as well, e.g. lm_head or model.norm.",
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Each lower layer trains at the learning rate times this, once more."
    )
    unfreeze_every: int | None = Field(
        None, ge=1, description="Gradual unfreezing: one more (lower) layer trains every N epochs or steps."
    )
    unfreeze_unit: Literal["epoch", "step"] = Field("epoch", description="What unfreeze_every counts.")

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeSpec:
        if self.trainable_layers == 0 and not self.trainable_modules:
            raise ValueError("nothing would train; set trainable_layers above 0 or list trainable_modules")
        if self.unfreeze_every is not None and self.trainable_layers < 2:
            raise ValueError("unfreeze_every needs trainable_layers of 2 or more: one layer cannot unfreeze")
        for pattern in self.trainable_modules:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"trainable_modules: {pattern!r} is not a regex ({error})") from None
        return self


class QuantizationSpec(Section):
    """QLoRA's quantized base: 4-bit weights through bitsandbytes, the LoRA adapter in full precision."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normal weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = Field("bf16", description="Dtype of the matmuls.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        "paged_adamw_8bit", description="Paged optimizers move their state to CPU memory under pressure."
    )


class PromptLearningSpec(Section):
    """Soft prompts through peft: p-tuning (prompt encoder), prefix tuning, prompt tuning."""

    num_virtual_tokens: int = Field(20, ge=1, description="Trained virtual tokens before each input.")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="p-tuning: hidden size of the prompt encoder (default: the model's)."
    )
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="p-tuning: the prompt encoder.")
    prefix_projection: bool = Field(False, description="prefix: train the prefix through an MLP.")
    init_text: str | None = Field(
        None, description="prompt: start the virtual tokens from this text's embeddings, not at random."
    )

    def misplaced(self, method: str) -> list[str]:
        """Settings given that the method does not read, as 'key (for method)' strings."""
        owners = {
            "encoder_hidden_size": ("p-tuning", self.encoder_hidden_size is not None),
            "encoder_type": ("p-tuning", self.encoder_type != "MLP"),
            "prefix_projection": ("prefix", self.prefix_projection),
            "init_text": ("prompt", self.init_text is not None),
        }
        return [f"{key} (for {owner})" for key, (owner, given) in owners.items() if given and owner != method]


# The recipe section each training method reads; any other method section given is an error.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "full": (),
    "freeze": ("freeze",),
    "lora": ("lora",),
    "qlora": ("lora", "quantization"),
    "p-tuning": ("prompt_learning",),
    "prefix": ("prompt_learning",),
    "prompt": ("prompt_learning",),
}


class FsdpSpec(Section):
    """FSDP settings of a distributed run, written into its accelerate config file."""

    version: Literal[1, 2] = Field(2, description="FSDP implementation (2: per-parameter sharding).")
    sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        "FULL_SHARD", description="What is sharded: parameters, gradients and optimizer state, or less."
    )
    offload_params: bool = Field(False, description="Keep parameters in CPU memory between uses.")
    wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    activation_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")


class DeepSpeedSpec(Section):
    """DeepSpeed ZeRO settings of a distributed run, written into its accelerate config file."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO 1: optimizer, 2: +gradients, 3: +weights.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"


class DistributedSpec(Section):
    """Training over several processes, GPUs or machines, launched with `accelerate launch`."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="none: one process in the flow's own; ddp, fsdp or deepspeed: launched workers."
    )
    processes_per_node: int = Field(1, ge=1, description="Processes per machine, usually one per GPU.")
    nodes: int = Field(1, ge=1, description="Machines; start the flow on each with its node_rank.")
    node_rank: int = Field(0, ge=0, description="This machine's rank, 0 on the main one.")
    main_address: str = Field("127.0.0.1", description="Address of the node_rank 0 machine.")
    main_port: int = Field(29500, ge=0, le=65535, description="Rendezvous port; 0: a free one (one node).")
    wait_s: int = Field(
        600,
        ge=1,
        description="Seconds a node waits for the others: for every node to join at main_address:main_port, "
        "and (node_rank > 0) for the main node to publish the trained stage once the workers are done.",
    )
    fsdp: FsdpSpec = FsdpSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()

    @property
    def world_size(self) -> int:
        """Processes in the whole run."""
        return self.processes_per_node * self.nodes

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.world_size > 1 and self.strategy == "none":
            raise ValueError(
                f"{self.world_size} processes with strategy none; set strategy to ddp, fsdp or deepspeed"
            )
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nodes {self.nodes}")
        if self.main_port == 0 and self.nodes > 1:
            raise ValueError("main_port 0 (a free port) works on one node only; give the port all nodes use")
        return self


class TrainSpec(Section):
    """Supervised fine-tuning with TRL's SFT trainer; loss on assistant tokens only."""

    method: Literal["full", "freeze", "lora", "qlora", "p-tuning", "prefix", "prompt"] = Field(
        "lora", description="What trains: every weight, the top layers, a LoRA adapter or a soft prompt."
    )
    lora: LoraSpec | None = Field(None, description="lora and qlora (filled with defaults for them).")
    freeze: FreezeSpec | None = Field(None, description="freeze (filled with defaults for it).")
    quantization: QuantizationSpec | None = Field(None, description="qlora (filled with defaults for it).")
    prompt_learning: PromptLearningSpec | None = Field(
        None, description="p-tuning, prefix and prompt (filled with defaults for them)."
    )
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many steps; -1 trains for `epochs`.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="Longest tokenized example; longer ones are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, description="Seed of weights' initialisation, dropout and data order.")
    logging_steps: int = Field(5, ge=1)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="Learning-rate schedule after the warmup.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: far less memory for long sequences "
        "(`tuneline train plan` shows both peaks), about a third slower.",
    )
    packing: bool = Field(
        False,
        description=(
            "Pack examples into rows of up to max_length tokens (best-fit decreasing); examples never "
            "attend to each other. With flash attention a batch is one padding-free sequence; with "
            "other attention (CPU, SDPA, eager) each row stays separate, padded to the batch's longest."
        ),
    )
    reasoning: Literal["include", "drop"] = Field(
        "include",
        description="Assistant turns with reasoning_content (chain-of-thought records): include trains "
        "on the reasoning and then the answer (rendered by the chat template when it knows "
        "reasoning_content, else as <think>...</think> before the answer); drop trains on the answer alone.",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate on the validation split every N steps (loss, exact match)."
    )
    eval_metric: Literal["loss", "exact_match"] = Field(
        "loss", description="Validation metric that picks the best checkpoint, kept as the result."
    )
    eval_max_examples: int = Field(
        32, ge=1, description="Validation records answered by greedy generation for exact match."
    )
    eval_max_new_tokens: int = Field(32, ge=1, description="Longest generated answer for exact match.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; a killed run resumes from it.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is kept as well).")
    resume: Literal["auto", "fresh"] = Field(
        "auto", description="auto: go on from the last complete checkpoint; fresh: delete it, start over."
    )
    distributed: DistributedSpec = DistributedSpec()

    @model_validator(mode="before")
    @classmethod
    def _fill_method_sections(cls, data: Any) -> Any:
        """The chosen method's sections get their defaults, so `train.lora.r` reads without a check."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "lora")
        sections = METHOD_SECTIONS.get(method, ()) if isinstance(method, str) else ()
        return {**data, **{name: {} for name in sections if data.get(name) is None}}

    @model_serializer(mode="wrap")
    def _omit_filled_sections(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """A method section still at its defaults is left out of dumps (loading fills it again): a
        run re-started from the Prefect UI, which edits the dumped parameters, can then switch
        method without deleting a section the user never set, while a section with settings of
        its own still fails for another method. `context={"resolved": True}` writes it out."""
        data = handler(self)
        if (info.context or {}).get("resolved"):
            return data
        for name in METHOD_SECTIONS[self.method]:
            if getattr(self, name) == type(getattr(self, name))():
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _sections_match_method(self) -> TrainSpec:
        used = METHOD_SECTIONS[self.method]
        for name, readers in (
            ("lora", "lora or qlora"),
            ("freeze", "freeze"),
            ("quantization", "qlora"),
            ("prompt_learning", "p-tuning, prefix or prompt"),
        ):
            if getattr(self, name) is not None and name not in used:
                raise ValueError(
                    f"train.{name} is set but train.method is {self.method}; remove train.{name} "
                    f"or set train.method to {readers}"
                )
        if self.freeze and self.freeze.unfreeze_every and self.distributed.strategy != "none":
            # DDP and FSDP fix the set of parameters they synchronise when they wrap the model.
            raise ValueError(
                "train.freeze.unfreeze_every: gradual unfreezing runs in one process only; remove it "
                "or set train.distributed.strategy to none"
            )
        misplaced = self.prompt_learning.misplaced(self.method) if self.prompt_learning else []
        if misplaced:
            raise ValueError(
                f"train.prompt_learning: {', '.join(misplaced)} do(es) nothing with train.method "
                f"{self.method}; remove it or change the method"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_fits_checkpoints(self) -> TrainSpec:
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("early_stopping_patience needs eval_steps: without evaluations nothing improves")
        if self.eval_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps {self.save_steps} is not a multiple of eval_steps {self.eval_steps}; the best "
                "checkpoint can only be kept when every checkpoint follows an evaluation"
            )
        return self
