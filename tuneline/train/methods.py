"""Training methods: how the base model is prepared for each one, before the trainer sees it.

`train.method` picks what trains:
- `full`: every weight; `freeze`: only the top decoder layers and named modules, optionally with a
  learning rate that decays layer by layer downwards and gradual unfreezing;
- `lora` / `qlora`: a LoRA adapter through peft, for qlora on a 4-bit NF4 base (bitsandbytes);
- `p-tuning`, `prefix`, `prompt`: soft prompts through peft.

The train stage calls, in order: `check_platform` (before any weight loads), `prepare_model`
(base loaded, frozen or wrapped with peft), `build_optimizer` and `method_callbacks` (for the
trainer), then `tuneline.export.export_model`. peft and bitsandbytes are imported inside the
functions that need them (seconds each).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from tuneline import models
from tuneline.errors import UserError
from tuneline.recipe import FreezeSpec, ModelSpec, TrainSpec

PEFT_METHODS = ("lora", "qlora", "p-tuning", "prefix", "prompt")
PROMPT_METHODS = ("p-tuning", "prefix", "prompt")


class MethodError(UserError, ValueError):
    """A method setting that this model or this machine cannot run."""


@dataclass
class PreparedModel:
    """The model ready for the trainer, with what the run logs about its method.

    `model` is a peft model for the peft methods (already wrapped: pass no peft_config to the
    trainer), else the base with `requires_grad` set. `layer_groups` (freeze only) lists the
    trainable decoder layers' parameters, top layer first: learning-rate decay and gradual
    unfreezing work on these groups; `extra_params` are the other trainable parameters
    (`trainable_modules`), always at the full learning rate.
    """

    model: Any
    method: dict[str, Any]
    layer_groups: list[list[torch.nn.Parameter]]
    extra_params: list[torch.nn.Parameter]


def describe_method(train: TrainSpec) -> dict[str, Any]:
    """The resolved method configuration: the method and the sections it reads, every default filled."""
    described: dict[str, Any] = {"name": train.method}
    for section in ("lora", "freeze", "quantization", "prompt_learning"):
        value = getattr(train, section)
        if value is not None:
            described[section] = value.model_dump(mode="json")
    return described


def build_peft_config(train: TrainSpec, *, tokenizer_name: str | None = None) -> Any:
    """The recipe's method as a peft config for a causal LM; None for `full` and `freeze`.

    `tokenizer_name` is needed by prompt tuning started from `init_text` (peft tokenizes the text).
    """
    if train.method not in PEFT_METHODS:
        return None
    import peft

    if train.method in ("lora", "qlora"):
        lora = train.lora
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=list(lora.modules_to_save) or None,
            use_rslora=lora.rslora,
            use_dora=lora.dora,
        )
    prompt = train.prompt_learning
    if train.method == "p-tuning":
        return peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prompt.num_virtual_tokens,
            encoder_hidden_size=prompt.encoder_hidden_size,
            encoder_reparameterization_type=prompt.encoder_type,
        )
    if train.method == "prefix":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prompt.num_virtual_tokens,
            prefix_projection=prompt.prefix_projection,
        )
    from_text = prompt.init_text is not None
    return peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prompt.num_virtual_tokens,
        prompt_tuning_init="TEXT" if from_text else "RANDOM",
        prompt_tuning_init_text=prompt.init_text,
        tokenizer_name_or_path=tokenizer_name if from_text else None,
    )


def build_quantization_config(train: TrainSpec) -> Any:
    """QLoRA's 4-bit base as a `BitsAndBytesConfig`; None for every other method."""
    if train.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    quantization = train.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if quantization.compute_dtype == "bf16" else torch.float32,
    )


def check_platform(train: TrainSpec) -> None:
    """Refuse, before any weight loads, a qlora setting this machine cannot run.

    Tried, not assumed: bitsandbytes quantizes a small tensor to the chosen 4-bit type and, for an
    8-bit or paged optimizer, takes one optimizer step, on the device training will use. bnb 0.50
    on CPU quantizes and runs 8-bit AdamW (slowly) but cannot page: paged optimizers are refused
    there, as is a missing or CUDA-only build, each with the setting to choose instead.
    """
    if train.method != "qlora":
        return
    quantization = train.quantization
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError(
            "train.method: qlora needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes` (keep your torch pinned), or set train.method to lora"
        )
    device, _ = models.choose_device()
    if device == "cuda" and quantization.compute_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise MethodError(
            "train.quantization.compute_dtype: bf16 is not supported by this GPU; set it to fp32"
        )
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional

        weight = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(
            weight, quant_type=quantization.quant_type, compress_statistics=quantization.double_quant
        )
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as error:  # any failure means this build cannot quantize here
        raise MethodError(
            f"train.method: qlora cannot quantize to 4-bit {quantization.quant_type} on {device} with "
            f"this bitsandbytes ({type(error).__name__}: {str(error).splitlines()[0][:160]}); install a "
            "bitsandbytes build for this device, or set train.method to lora"
        ) from None
    if quantization.optimizer == "adamw_torch":
        return
    try:
        # Above bitsandbytes' min_8bit_size (4096), so the 8-bit state path really runs.
        probe = torch.nn.Parameter(torch.randn(8192, device=device))
        optimizer = _bnb_optimizer_class(bnb, quantization.optimizer)([probe], lr=1e-3)
        probe.grad = torch.ones_like(probe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
    except Exception as error:
        raise MethodError(
            f"train.quantization.optimizer: {quantization.optimizer} does not run on {device} with this "
            f"bitsandbytes ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "set train.quantization.optimizer to adamw_torch"
        ) from None
    # bitsandbytes runs a paged optimizer on CPU as a plain one, with only a warning: the setting
    # would not do what it says, so it is refused here.
    unsupported = [str(w.message) for w in caught if "not supported" in str(w.message)]
    if unsupported:
        plain = quantization.optimizer.removeprefix("paged_")
        raise MethodError(
            f"train.quantization.optimizer: {quantization.optimizer} cannot page on {device} "
            f"(bitsandbytes: {unsupported[0]}); set train.quantization.optimizer to {plain} "
            "(the same optimizer without paging) or train on a CUDA GPU"
        )


def prepare_model(model_spec: ModelSpec, train: TrainSpec) -> PreparedModel:
    """Load the base for the method and make exactly the method's parameters trainable.

    qlora loads the base quantized to 4 bits; freeze sets `requires_grad` per layer; the peft
    methods wrap the base with their adapter (so the optimizer can be built before the trainer).
    """
    check_platform(train)
    quantization_config = build_quantization_config(train)
    if quantization_config is None:
        base = models.load_model(
            model_spec.name,
            revision=model_spec.revision,
            trust_remote_code=model_spec.trust_remote_code,
            allow_pickle_weights=model_spec.allow_pickle_weights,
        )
    else:
        base = _load_quantized(model_spec, quantization_config)
    base.train()
    if train.method == "full":
        base.requires_grad_(True)
        return PreparedModel(base, describe_method(train), [], [])
    if train.method == "freeze":
        groups, extra = apply_freeze(base, train.freeze)
        return PreparedModel(base, describe_method(train), groups, extra)
    from peft import get_peft_model

    peft_config = build_peft_config(train, tokenizer_name=model_spec.name)
    return PreparedModel(get_peft_model(base, peft_config), describe_method(train), [], [])


def apply_freeze(model: Any, freeze: FreezeSpec) -> tuple[list[list[torch.nn.Parameter]], list[Any]]:
    """Freeze everything but the top `trainable_layers` decoder layers and `trainable_modules`.

    Returns the layer groups (top layer first) and the other trainable parameters. With gradual
    unfreezing only the top group starts trainable; `method_callbacks` unfreezes the rest.
    """
    prefix, layers = decoder_layers(model)
    if freeze.trainable_layers > len(layers):
        raise MethodError(
            f"train.freeze.trainable_layers: {freeze.trainable_layers}, but the model has {len(layers)} "
            f"decoder layers; set at most {len(layers)} (or use train.method full)"
        )
    model.requires_grad_(False)
    top = list(reversed(range(len(layers))))[: freeze.trainable_layers]
    groups = [list(layers[index].parameters()) for index in top]
    in_layers = {id(p) for group in groups for p in group}
    patterns = [re.compile(pattern) for pattern in freeze.trainable_modules]
    extra = [
        param
        for name, param in model.named_parameters()
        if id(param) not in in_layers and any(p.search(name) for p in patterns)
    ]
    for pattern in patterns:
        if not any(pattern.search(name) for name, _ in model.named_parameters()):
            raise MethodError(
                f"train.freeze.trainable_modules: {pattern.pattern!r} matches no parameter of the model "
                f"(e.g. {prefix}.0.mlp.down_proj.weight, lm_head.weight); fix the pattern"
            )
    starting = groups[:1] if freeze.unfreeze_every else groups
    for param in [p for group in starting for p in group] + extra:
        param.requires_grad_(True)
    return groups, extra


def decoder_layers(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of decoder layers and its dotted name (e.g. `model.layers` for Llama)."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise MethodError(
        f"train.method: freeze cannot find the {count} decoder layers of {type(model).__name__}; "
        "use train.method full or lora"
    )


def build_optimizer(model: Any, train: TrainSpec, args: Any, prepared: PreparedModel) -> Any:
    """The optimizer the method needs, or None where the trainer's default (AdamW) is right.

    freeze with `layer_lr_decay` below 1 or gradual unfreezing: AdamW with one parameter group per
    layer (lr * decay**k for the k-th layer from the top; other trainable modules at the full lr),
    holding layers still frozen so that they train once unfrozen. qlora: the bitsandbytes optimizer
    named in `train.quantization.optimizer`. Hyperparameters come from the trainer's `args`; pass
    the result as `SFTTrainer(optimizers=(optimizer, None))` so the scheduler is still built.
    """
    betas = (args.adam_beta1, args.adam_beta2)
    if train.method == "qlora" and train.quantization.optimizer != "adamw_torch":
        import bitsandbytes as bnb

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer_class = _bnb_optimizer_class(bnb, train.quantization.optimizer)
        return optimizer_class(
            params, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon, weight_decay=args.weight_decay
        )
    if train.method != "freeze" or (train.freeze.layer_lr_decay == 1 and not train.freeze.unfreeze_every):
        return None
    decay = train.freeze.layer_lr_decay
    groups = [
        {"params": group, "lr": args.learning_rate * decay**depth}
        for depth, group in enumerate(prepared.layer_groups)
    ]
    if prepared.extra_params:
        groups.append({"params": prepared.extra_params, "lr": args.learning_rate})
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon, weight_decay=args.weight_decay
    )


class GradualUnfreezing(TrainerCallback):
    """Unfreezes one more layer group, downwards, every `every` epochs or steps.

    The number unfrozen is computed from the trainer state each time, so a resumed run is at the
    same point as an uninterrupted one.
    """

    def __init__(self, groups: list[list[torch.nn.Parameter]], every: int, unit: str) -> None:
        self.groups = groups
        self.every = every
        self.unit = unit

    def unfrozen(self, state: Any) -> int:
        """Layer groups trainable at this point of training."""
        elapsed = int(state.epoch or 0) if self.unit == "epoch" else state.global_step
        return min(len(self.groups), 1 + elapsed // self.every)

    def _apply(self, state: Any) -> None:
        count = self.unfrozen(state)
        for depth, group in enumerate(self.groups):
            for param in group:
                param.requires_grad_(depth < count)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state)


def method_callbacks(train: TrainSpec, prepared: PreparedModel) -> list[Any]:
    """Trainer callbacks the method needs (gradual unfreezing); pass them as `callbacks=`."""
    if train.method == "freeze" and train.freeze.unfreeze_every:
        return [
            GradualUnfreezing(prepared.layer_groups, train.freeze.unfreeze_every, train.freeze.unfreeze_unit)
        ]
    return []


def count_parameters(prepared: PreparedModel) -> tuple[int, int]:
    """(trainable, total) parameters of the prepared model, as `tuneline train plan` counts them.

    Layers that gradual unfreezing opens later count as trainable; a 4-bit weight counts its
    elements, not the bytes it is packed into.
    """
    later = {id(param) for group in prepared.layer_groups for param in group}
    params = list(prepared.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad or id(p) in later)
    total = sum(_element_count(p) for p in params)
    return trainable, total


def _element_count(param: torch.nn.Parameter) -> int:
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit: packed storage
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def _load_quantized(model_spec: ModelSpec, quantization_config: Any) -> Any:
    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device, dtype = models.choose_device()
    models.check_weights_format(model_spec)
    with models.explain_load_errors(model_spec):
        base = AutoModelForCausalLM.from_pretrained(
            model_spec.name,
            quantization_config=quantization_config,
            dtype=dtype,
            # Each process of a launched run holds its own copy of the base on its own GPU.
            device_map={"": PartialState().local_process_index} if device == "cuda" else None,
            **models.pretrained_kwargs(model_spec),  # revision, remote code, safetensors only
        )
    keep_narrow_layers_off_packed_cpu_kernel(base)
    # Norms to fp32 and input gradients on; checkpointing is the trainer's setting, not set here.
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def keep_narrow_layers_off_packed_cpu_kernel(model: Any) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer for its AVX512-BF16 CPU kernel on the first forward
    in eval mode, assuming `in_features` is a multiple of the quantization block (64): a narrower
    layer (tiny test models) fails there with "shape '[32, 0]' is invalid". Those layers keep the
    generic kernel; on a CPU without AVX512-BF16 every layer does anyway."""
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        narrow = quant_state is not None and module.in_features % quant_state.blocksize
        if narrow and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _bnb_optimizer_class(bnb: Any, name: str) -> Any:
    classes = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return classes[name]
