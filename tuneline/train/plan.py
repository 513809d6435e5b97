"""`tuneline train plan`: parameters and peak training memory of a recipe, before any weight loads.

The model is built from its config on the meta device (accelerate's `init_empty_weights`), so a
7B plan needs neither the weights file nor the memory. The method is applied to that empty model
exactly as training applies it (the same freeze and peft code), which is why the trainable count
matches the real run's.

The memory figure is an estimate for planning, not a measurement: weights by dtype (4-bit NF4 for
qlora's linear layers), gradients and AdamW states of the trainable parameters, and activations
for one micro-batch of `batch_size x max_length` tokens without activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuneline import models
from tuneline.recipe import ModelSpec, TrainSpec
from tuneline.train import methods

GIB = 1024**3
# Bytes of stored activations per token, per layer, per hidden unit, at 16-bit (Korthikanti et
# al. 2022, "Reducing Activation Recomputation"); the attention scores add 5 * heads * seq bytes.
ACTIVATION_BYTES_PER_HIDDEN = 34
# NF4: 4 bits per weight, plus an fp32 absmax per 64 weights (0.5 bit) or, double-quantized, an
# 8-bit absmax per 64 and an fp32 per 256 blocks (~0.127 bit).
NF4_BITS = {True: 4.127, False: 4.5}


@dataclass
class TrainingPlan:
    """What `tuneline train plan` prints: parameter counts and the memory estimate in bytes."""

    model: str
    method: str
    device: str
    dtype: str
    total_params: int
    trainable_params: int
    memory: dict[str, int]
    checkpointed_activations: int

    @property
    def peak_bytes(self) -> int:
        """The estimated peak: every component at once (the backward pass holds them all)."""
        return sum(self.memory.values())

    @property
    def checkpointed_peak_bytes(self) -> int:
        """The peak if activations were recomputed in the backward pass instead of kept."""
        return self.peak_bytes - self.memory["activations"] + self.checkpointed_activations


def plan_training(model_spec: ModelSpec, train: TrainSpec, *, device: str | None = None) -> TrainingPlan:
    """Count parameters and estimate peak training memory from the model's config alone.

    `device` (cuda or cpu) picks the weight dtype as training would there (bf16 on a GPU); by
    default the device of this machine.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    device = device or models.choose_device()[0]
    if device not in ("cuda", "cpu"):
        raise methods.MethodError(f"--device: {device!r} is not a device to plan for; use cuda or cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = models.load_config(model_spec)  # a model that needs its own code, or is unknown: ModelError
    with init_empty_weights(), models.explain_load_errors(model_spec):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=model_spec.trust_remote_code, dtype=dtype
        )
    _tie_embeddings(model, config)
    with init_empty_weights():
        prepared = _apply_method(model, train)
    trainable, total = methods.count_parameters(prepared)
    weight_bytes = _weight_bytes(model, train)
    trainable_bytes = 4 if train.method in methods.PEFT_METHODS else dtype.itemsize  # peft keeps fp32
    text = config.get_text_config()
    return TrainingPlan(
        model=model_spec.name,
        method=train.method,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        total_params=total,
        trainable_params=trainable,
        memory={
            "weights": weight_bytes,
            "gradients": trainable * trainable_bytes,
            "optimizer": trainable * _optimizer_bytes(train),
            "activations": _activation_bytes(text, train, device, prepared, checkpointed=False),
        },
        checkpointed_activations=_activation_bytes(text, train, device, prepared, checkpointed=True),
    )


def _apply_method(model: Any, train: TrainSpec) -> methods.PreparedModel:
    """The method applied to the empty model with the code training uses."""
    if train.method == "full":
        return methods.PreparedModel(model, methods.describe_method(train), [], [])
    if train.method == "freeze":
        groups, extra = methods.apply_freeze(model, train.freeze)
        return methods.PreparedModel(model, methods.describe_method(train), groups, extra)
    from peft import get_peft_model

    if train.method == "prompt" and train.prompt_learning.init_text is not None:
        # Text initialisation reads embedding values, which an empty model has not; the count is
        # the same as with random initialisation.
        train = train.model_copy(
            update={"prompt_learning": train.prompt_learning.model_copy(update={"init_text": None})}
        )
    return methods.PreparedModel(
        get_peft_model(model, methods.build_peft_config(train)), methods.describe_method(train), [], []
    )


def _tie_embeddings(model: Any, config: Any) -> None:
    """Share the input embeddings with `lm_head` as loading would: an empty model (init_empty_weights)
    is left untied, which counted a tied model's embeddings twice (SmolLM2: 168M for 135M)."""
    output = model.get_output_embeddings()
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and output is not None:
        output.weight = model.get_input_embeddings().weight


def _weight_bytes(model: Any, train: TrainSpec) -> int:
    """Bytes of every stored weight: base (4-bit where qlora quantizes it) and adapter; a tied
    weight once."""
    total, seen = 0.0, set()
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * _bits(name, module, param_name, param, train) / 8
    return int(total)


def _bits(name: str, module: Any, param_name: str, param: Any, train: TrainSpec) -> float:
    if any(part in name for part in ("lora_", "prompt_encoder", "modules_to_save")):
        return 32  # peft keeps adapters in fp32
    if train.method != "qlora":
        return param.element_size() * 8
    if isinstance(module, torch.nn.Linear) and param_name == "weight" and not name.endswith("lm_head"):
        return NF4_BITS[train.quantization.double_quant]
    return 32  # prepare_model_for_kbit_training keeps the rest in fp32


def _optimizer_bytes(train: TrainSpec) -> int:
    """Bytes of AdamW state per trainable parameter: two moments, fp32 or 8-bit."""
    if train.method == "qlora" and train.quantization.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        return 2
    return 8


def _activation_bytes(
    text: Any, train: TrainSpec, device: str, prepared: methods.PreparedModel, *, checkpointed: bool
) -> int:
    """Stored activations of one micro-batch, and the fp32 logits with their gradient.

    With activation checkpointing only each layer's input is kept, plus one layer recomputed at a
    time. On a GPU the fused attention kernels (SDPA) do not keep the attention scores; on CPU the
    plain path does.
    """
    dtype_bytes = 2 if device == "cuda" else 4
    seq = train.max_length
    if train.method in methods.PROMPT_METHODS:
        seq += train.prompt_learning.num_virtual_tokens
    tokens = train.batch_size * seq
    hidden, heads = text.hidden_size, text.num_attention_heads
    scores = 0 if device == "cuda" else 5 * heads * seq
    per_layer = tokens * (ACTIVATION_BYTES_PER_HIDDEN * hidden + scores) * dtype_bytes / 2
    layers = text.num_hidden_layers
    if train.method == "freeze" and train.freeze.trainable_layers < layers:
        # Below the lowest trainable layer nothing needs a gradient, so nothing is stored there
        # (unless an embedding trains: then every layer is on the gradient's path).
        embedding_trains = any(p.dim() == 2 and p.shape[0] == text.vocab_size for p in prepared.extra_params)
        layers = layers if embedding_trains else train.freeze.trainable_layers
    logits = 2 * tokens * text.vocab_size * 4
    if checkpointed:
        return int(tokens * hidden * dtype_bytes * layers + per_layer + logits)
    return int(per_layer * layers + logits)


def format_plan(plan: TrainingPlan) -> str:
    """The plan as the CLI prints it."""
    share = plan.trainable_params / plan.total_params if plan.total_params else 0.0
    lines = [
        f"model      {plan.model}",
        f"method     {plan.method} on {plan.device} ({plan.dtype} weights)",
        f"parameters {plan.total_params:,} total, {plan.trainable_params:,} trainable ({share:.2%})",
        "memory (estimate, one micro-batch, no activation checkpointing):",
    ]
    lines += [f"  {name:<12}{size / GIB:9.3f} GiB" for name, size in plan.memory.items()]
    lines.append(f"  {'peak':<12}{plan.peak_bytes / GIB:9.3f} GiB")
    lines.append(f"  with activation checkpointing: {plan.checkpointed_peak_bytes / GIB:.3f} GiB peak")
    return "\n".join(lines)
