"""The `base_model` stage: a GGUF base model, dequantized once into a normal model folder.

`model.name` may name a GGUF file (what Ollama, LM Studio and llama.cpp keep): a local `.gguf`
path, or `<repo>:<file>.gguf` on the hub as `transformers serve` names it. transformers reads such
a file only by dequantizing every tensor (about a minute for a 135M model on two cores), and the
model it returns refuses `save_pretrained`. So the file is dequantized once into a stage keyed on
its content (sha256), the transformers version and this code: `model/` holds safetensors weights
and the tokenizer with its chat template, and every later load (train, evaluate, register, the
next run) reads that folder like any other model. The file's sha256 is itself cached by path,
size and modification time, so an unchanged file is not read again on the next run.

A recipe whose model is not a GGUF file passes through unchanged.
"""

from __future__ import annotations

from pathlib import Path

from tuneline.models import gguf_path, is_gguf
from tuneline.pipeline import BASE_MODEL
from tuneline.recipe import ModelSpec
from tuneline.store import StageWriter, cached_sha256, find_stage, reuse_or_write, stage_key

MODEL_DIR = "model"


def gguf_digest(artifacts_dir: str | Path, path: Path) -> str:
    """The file's sha256, remembered by path, size and modification time (a GGUF file is GBs)."""
    return cached_sha256(artifacts_dir, [path])[path]


def base_model_key(file_digest: str) -> str:
    """The stage's digest: the file's content, the transformers version that reads it, the code."""
    import transformers

    return stage_key(BASE_MODEL, file_digest, transformers.__version__)


def resolve_base_model(artifacts_dir: str | Path, spec: ModelSpec) -> ModelSpec:
    """The recipe's model as a loadable folder: a GGUF file becomes its `base_model` stage's model
    folder (dequantized on first use); any other model is returned as it is."""
    if not is_gguf(spec):
        return spec
    path = gguf_path(spec)
    digest = base_model_key(gguf_digest(artifacts_dir, path))
    found = find_stage(artifacts_dir, BASE_MODEL.name, digest) or reuse_or_write(
        artifacts_dir, BASE_MODEL, digest, lambda writer: dequantize_gguf(path, writer)
    )
    return spec.model_copy(update={"name": str(found.file(MODEL_DIR)), "revision": None})


def dequantize_gguf(path: Path, writer: StageWriter) -> None:
    """Load the GGUF file through transformers (dequantized to fp32) and save it as safetensors.

    The loaded model carries the GGUF quantization config and refuses `save_pretrained`, so its
    weights move into a model built from the same config without it.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out_dir = writer.path(MODEL_DIR)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    writer.stats.update(
        {
            "gguf_file": str(path),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
