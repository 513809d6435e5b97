"""Benchmark on a GPU: Tuneline's train stage against plain TRL on randomly initialised 1B and 7B
Llama configurations, LoRA and QLoRA, with tokens/s and peak GPU memory.

Each size is built once (random weights, bf16, saved as a local model folder with a small BPE
tokenizer: only the shapes matter for speed and memory), then every method trains the same
rows of about `--seq` tokens, batch 1, with activation checkpointing, first through Tuneline's
`run_train`, then through a plain TRL SFT script with identical settings, in this one process.
Peak memory is `torch.cuda.max_memory_allocated()` over each training. Goals: Tuneline >= plain
TRL tokens/s; 7B QLoRA at sequence length 1024 under 6 GB.

    python bench/train_gpu.py --out bench/results/train_gpu.txt     # on a CUDA machine
    python bench/train_gpu.py --smoke                               # tiny shapes, any device
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
from pathlib import Path

import torch
import train_throughput  # this folder: the plain TRL script both benchmarks compare with

from tuneline import models
from tuneline.recipe import LoraSpec, ModelSpec, QuantizationSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import find_stage, read_stats, write_stage
from tuneline.train import stage as train

# Llama shapes: TinyLlama-1.1B and Llama-2-7B (vocabulary 32,000: the tokenizer uses its first ids).
SIZES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4},
}  # fmt: skip
WORDS = [
    *("model", "data", "train", "token", "adapter", "layer"),
    *("memory", "speed", "batch", "sequence", "gradient", "weight"),
]
GIB = 1024**3


def build_model(root: Path, size: str, tokenizer_dir: Path) -> Path:
    """A local model folder with random weights of the size's shapes, in bf16 (fp32 on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tokenizer_dir)
    config.update({**SIZES[size], "vocab_size": 32000, "max_position_embeddings": 4096})
    device, dtype = models.choose_device()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    out = root / size
    model.save_pretrained(out)
    del model
    for path in tokenizer_dir.iterdir():  # the tokenizer and its chat template
        if path.name != "config.json" and not path.name.startswith("model"):
            (out / path.name).write_bytes(path.read_bytes())
    _free()
    return out


def make_rows(root: Path, tokenizer_dir: Path, records: int, seq: int) -> tuple:
    """Conversations that fill about `seq` tokens (a long question, a short answer), as a split stage."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    rows = []
    for index in range(records):
        answer = {"role": "assistant", "content": " ".join(rng.sample(WORDS, 6))}
        words = [rng.choice(WORDS) for _ in range(seq)]
        while True:  # drop words until the rendered conversation fits with a little room
            messages = [{"role": "user", "content": " ".join(words) + f" #{index}"}, answer]
            length = len(
                tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            )
            if length <= seq - 8:
                break
            del words[min(len(words) - 1, len(words) * (seq - 8) // length) :]
        rows.append(make_record(messages))
    with write_stage(root / "art", "split", "bench-gpu") as writer:
        for record in rows:
            writer.count_in()
            writer.keep(record, "train.jsonl")
    return find_stage(root / "art", "split", "bench-gpu"), rows


def spec_for(method: str, args: argparse.Namespace) -> TrainSpec:
    """The settings both sides train with (paged 8-bit AdamW for QLoRA where it can page: CUDA)."""
    device, dtype = models.choose_device()
    quantization = QuantizationSpec(
        compute_dtype="bf16" if dtype == torch.bfloat16 else "fp32",
        optimizer="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
    )
    return TrainSpec(
        method=method,
        lora=LoraSpec(r=16, alpha=32, dropout=0.0),
        quantization=quantization if method == "qlora" else None,
        max_steps=args.steps,
        learning_rate=2e-4,
        batch_size=1,
        max_length=args.seq,
        activation_checkpointing=True,
        logging_steps=max(1, args.steps // 4),
        save_steps=args.steps + 1,  # no checkpoint inside the timed steps: the TRL script saves none
        seed=0,
    )


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def run_tuneline(artifacts_dir: Path, splits, model: ModelSpec, spec: TrainSpec) -> tuple[float, float]:
    """Tokens/s and peak GiB of Tuneline's train stage."""
    _free()
    stats = read_stats(train.run_train(artifacts_dir, splits, model, spec))
    return stats["tokens"] / stats["seconds"], _peak_gib()


def run_plain_trl(model: ModelSpec, rows: list[dict], spec: TrainSpec, out_dir: Path) -> tuple[float, float]:
    """Tokens/s and peak GiB of the plain TRL SFT script with the same settings."""
    _free()
    tokens, seconds = train_throughput.run_plain_trl(model, rows, spec, out_dir)
    peak = _peak_gib()
    _free()
    return tokens / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1b,7b")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 4 steps of 128 tokens, any device")
    parser.add_argument("--out", type=Path, help="Also append the results to this file.")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.steps, args.seq = "smoke", 4, 128
    device, _ = models.choose_device()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    lines = [f"train on {gpu}: random-init Llama, batch 1 x {args.seq} tokens, {args.steps} steps, LoRA r16 "
             f"all-linear, activation checkpointing; peak = torch.cuda.max_memory_allocated"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = models.make_tiny_model(root / "tokenizer", [" ".join(WORDS)] * 50, vocab_size=400)
        splits, rows = make_rows(root, tokenizer_dir, records=args.steps + 4, seq=args.seq)
        for size in args.sizes.split(","):
            model = ModelSpec(name=str(build_model(root, size, tokenizer_dir)))
            for method in args.methods.split(","):
                spec = spec_for(method, args)
                ours, our_peak = run_tuneline(root / f"art-{size}-{method}", splits, model, spec)
                plain, plain_peak = run_plain_trl(model, rows, spec, root / f"trl-{size}-{method}")
                lines.append(
                    f"{size:5s} {method:6s} tuneline {ours:9.1f} tokens/s, peak {our_peak:6.2f} GiB | "
                    f"plain TRL {plain:9.1f} tokens/s, peak {plain_peak:6.2f} GiB | ratio {ours / plain:.2f}"
                )
                print(lines[-1], flush=True)
    lines.append("goals: ratio >= 1.0; 7b qlora at 1024 tokens under 6 GB (5.59 GiB)")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
