"""Benchmark: Tuneline's train stage against a plain TRL SFT script, and packing against padding.

Builds one tiny Llama model and one set of mixed-length conversations (short labels, questions
from a few words to a paragraph), then trains on CPU (or the GPU when there is one):
1. Tuneline's `run_train` (LoRA, assistant-only loss, the tracking callback on) and a plain TRL
   script with identical settings (same model, rows, LoRA, batch, steps, seed), in one process;
   tokens/s of each and the ratio (goal: >= 1.0);
2. Tuneline with `train.packing` on and off on the same data: tokens/s ratio (goal: >= 1.5).

Tokens are the real (non-padding) tokens TRL counts; seconds are those of `trainer.train()`, so
both sides pay the same model loading outside the timing. Tuneline saves no checkpoint inside
the timed steps here (save_steps > steps), as the plain script saves none.

    python bench/train_throughput.py                      # the measurement (a few minutes)
    python bench/train_throughput.py --steps 6 --records 64 --repeat 1   # smoke run
    python bench/train_throughput.py --out bench/results/train_throughput.txt
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tuneline import models, train
from tuneline.recipe import LoraSpec, ModelSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import find_stage, read_stats, write_stage

WORDS = [
    *("order", "parcel", "refund", "lamp", "chair", "delivery", "invoice", "account", "password"),
    *("address", "shipping", "cancel", "return", "broken", "late", "missing", "charge", "card"),
    *("discount", "coupon", "warranty", "store", "manager", "email", "phone"),
]
LABELS = ["refund", "shipping_status", "cancel_order", "account_help", "billing", "warranty"]


def make_data(root: Path, records: int, seed: int) -> tuple:
    """A split stage of mixed-length labelling conversations, and a tiny model trained on its words."""
    rng = random.Random(seed)
    rows = []
    for index in range(records):
        length = rng.choice([3, 5, 8, 20, 60, 120])  # mostly short, some long: padding wastes work
        question = " ".join(rng.choice(WORDS) for _ in range(length)) + f" #{index}"
        messages = [
            {"role": "system", "content": "Label the message."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": rng.choice(LABELS)},
        ]
        rows.append(make_record(messages))
    with write_stage(root / "art", "split", "bench") as writer:
        for record in rows:
            writer.count_in()
            writer.keep(record, "train.jsonl")
    corpus = [m["content"] for r in rows for m in r["messages"]]
    base = models.make_tiny_model(root / "base", corpus, vocab_size=1000, hidden_size=256, num_layers=4)
    return find_stage(root / "art", "split", "bench"), ModelSpec(name=str(base)), rows


def spec_for(args: argparse.Namespace, **changes: object) -> TrainSpec:
    """The settings both sides train with."""
    spec = TrainSpec(
        lora=LoraSpec(r=16, alpha=32, dropout=0.0),
        max_steps=args.steps,
        learning_rate=2e-4,
        batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=max(1, args.steps // 4),
        save_steps=args.steps + 1,  # no checkpoint inside the timed steps: the TRL script saves none
        seed=0,
    )
    return spec.model_copy(update=changes)


def run_tuneline(artifacts_dir: Path, splits, model: ModelSpec, spec: TrainSpec) -> tuple[float, float]:
    """Tokens/s of Tuneline's train stage (a new artifacts folder each time), and real tokens per step."""
    stats = read_stats(train.run_train(artifacts_dir, splits, model, spec))
    return stats["tokens"] / stats["seconds"], stats["tokens"] / stats["steps"]


def run_plain_trl(model: ModelSpec, rows: list[dict], spec: TrainSpec, out_dir: Path) -> float:
    """Tokens/s of a plain TRL SFT script with the same settings (LoRA, or QLoRA: the base loaded
    in 4 bits through transformers' BitsAndBytesConfig, as TRL's documentation does it)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    device, dtype = models.choose_device()
    set_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(model.name)
    quantized = spec.method == "qlora"
    if quantized:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(
            model.name,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": 0 if device == "cuda" else "cpu"},
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(model.name, dtype=dtype).to(device)
    extra: dict = {"activation_checkpointing": spec.activation_checkpointing}
    if spec.activation_checkpointing:
        extra["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if quantized:
        extra["optim"] = spec.quantization.optimizer
    config = SFTConfig(
        output_dir=str(out_dir),
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.batch_size,
        max_length=spec.max_length,
        packing=spec.packing,
        logging_steps=spec.logging_steps,
        seed=spec.seed,
        data_seed=spec.seed,
        assistant_only_loss=True,
        use_cpu=device != "cuda",
        bf16=dtype == torch.bfloat16,
        **extra,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = spec.lora
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear",
    )
    dataset = Dataset.from_list([{"messages": [dict(m) for m in r["messages"]]} for r in rows])
    trainer = SFTTrainer(
        model=base, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="Runs per side; the best one counts.")
    parser.add_argument("--out", type=Path, help="Also write the results to this file.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits, model, rows = make_data(root, args.records, seed=0)
        spec = spec_for(args)
        results: dict[str, list[float]] = {"tuneline": [], "trl": [], "padding": [], "packing": []}
        # Warm-up: the first training in a process pays one-time costs (kernels, allocator, imports).
        run_plain_trl(model, rows, spec.model_copy(update={"max_steps": 2}), root / "warm-up")
        for attempt in range(args.repeat):  # interleaved, alternating who goes first
            if attempt % 2:
                rate, tokens_per_step = run_tuneline(root / f"art-{attempt}", splits, model, spec)
                results["trl"].append(run_plain_trl(model, rows, spec, root / f"trl-{attempt}"))
            else:
                results["trl"].append(run_plain_trl(model, rows, spec, root / f"trl-{attempt}"))
                rate, tokens_per_step = run_tuneline(root / f"art-{attempt}", splits, model, spec)
            results["tuneline"].append(rate)
            results["padding"].append(rate)
            # Packed rows of max_length tokens, as many per step as the padded batches held real
            # tokens: the same work per optimizer step, without the padding. (Without a varlen
            # attention kernel, as on CPU, each packed row stays its own row of the batch:
            # tuneline/packed_rows.py.)
            rows_per_step = max(1, round(tokens_per_step / args.max_length))
            packed = spec_for(args, packing=True, batch_size=rows_per_step)
            results["packing"].append(run_tuneline(root / f"pack-{attempt}", splits, model, packed)[0])
    best = {name: max(values) for name, values in results.items()}

    def paired(mine: str, baseline: str) -> str:
        """The ratio within each attempt (run back to back), for a machine whose speed drifts."""
        ratios = sorted(a / b for a, b in zip(results[mine], results[baseline], strict=True))
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        return f"; per attempt {each}, median {statistics.median(ratios):.2f}"

    device, _ = models.choose_device()
    lines = [
        f"train throughput: tiny Llama (hidden 256, 4 layers), LoRA r16, {args.records} mixed-length records,"
        f" {args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, device {device}, "
        f"best of {args.repeat}; load average {os.getloadavg()[0]:.2f}",
        f"tuneline train stage : {best['tuneline']:9.1f} tokens/s",
        f"plain TRL script     : {best['trl']:9.1f} tokens/s",
        f"ratio tuneline/TRL   : {best['tuneline'] / best['trl']:9.2f}   (goal >= 1.0)"
        + paired("tuneline", "trl"),
        f"padding              : {best['padding']:9.1f} tokens/s",
        f"packing              : {best['packing']:9.1f} tokens/s",
        f"ratio packing/padding: {best['packing'] / best['padding']:9.2f}   (goal >= 1.5)"
        + paired("packing", "padding"),
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
