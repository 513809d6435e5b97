"""Export of a trained model, and loading it back: what leaves the train stage.

`adapter/` holds the peft adapter of every peft method (soft prompts included) and `model/` the
merged full model where a merge exists, both in safetensors with the tokenizer beside them, so
plain transformers/peft load them without Tuneline. `tuneline.models.load_trained` reads either back
for evaluation and serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline import models
from tuneline.recipe import ModelSpec, TrainSpec
from tuneline.train.methods import PEFT_METHODS


def export_model(
    trained: Any, tokenizer: Any, stage_dir: Path, model_spec: ModelSpec, train: TrainSpec
) -> dict[str, str]:
    """Write `adapter/` (every peft method) and `model/` (merged full model) where a merge exists.

    Both load without Tuneline: `model/` with AutoModelForCausalLM and AutoTokenizer, `adapter/`
    with `PeftModel.from_pretrained(base, adapter_dir)` (the tokenizer is saved beside it too).
    lora merges in place, so `trained` is consumed; qlora merges into a full-precision reload of
    the base (a 4-bit base cannot hold the merged weights); soft prompts have no merged form.
    Returns the folders written, by name.
    """
    written: dict[str, str] = {}
    if train.method in PEFT_METHODS:
        adapter_dir = stage_dir / "adapter"
        trained.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        written["adapter"] = str(adapter_dir)
    model_dir = stage_dir / "model"
    if train.method in ("full", "freeze"):
        merged = trained
    elif train.method == "lora":
        merged = trained.merge_and_unload()
    elif train.method == "qlora":
        from peft import PeftModel

        base = models.load_model(
            model_spec.name,
            revision=model_spec.revision,
            trust_remote_code=model_spec.trust_remote_code,
            allow_pickle_weights=model_spec.allow_pickle_weights,
        )
        merged = PeftModel.from_pretrained(base, stage_dir / "adapter").merge_and_unload()
    else:
        return written
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    written["model"] = str(model_dir)
    return written
