"""Benchmark: Tuneline's train stage against a plain TRL SFT script, and packing against padding.

Builds one tiny Llama model and one set of mixed-length conversations (short labels, questions
from a few words to a paragraph), then trains on CPU (or the GPU when there is one), in one process:
1. Tuneline's `run_train` (LoRA, assistant-only loss, the tracking callback on) and a plain TRL
   script with identical settings (same model, rows, LoRA, batch, steps, seed): tokens/s of each
   and the ratio (goal: >= 1.0);
2. Tuneline with `train.packing` on, at the same real tokens per step: tokens/s against the padded
   run of 1. (goal: >= 1.5).

The three trainings run in processes that take turns optimizer step by optimizer step (`Lockstep`),
so the drift of a shared machine's speed, which made back-to-back runs differ by +-10%, falls on
all three alike; the order of the turns rotates from round to round, so no training always
follows the same other one. Tokens are the real (non-padding) tokens TRL counts; seconds are each one's own
time inside `trainer.train()`, so both sides pay model loading and tokenizing outside the timing.
Tuneline saves no checkpoint inside the timed steps here (save_steps > steps), as the plain script
saves none.

    python bench/train_throughput.py                      # the measurement (a few minutes)
    python bench/train_throughput.py --steps 6 --records 64 --repeat 1   # smoke run
    python bench/train_throughput.py --out bench/results/train_throughput.txt
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from tuneline import models
from tuneline.recipe import LoraSpec, ModelSpec, TrainSpec
from tuneline.records import make_record
from tuneline.store import find_stage, read_stats, write_stage
from tuneline.train import stage as train

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


def run_tuneline(artifacts_dir: Path, splits, model: ModelSpec, spec: TrainSpec) -> tuple[int, int]:
    """Real tokens Tuneline's train stage trained on (a new artifacts folder each time), and its steps."""
    stats = read_stats(train.run_train(artifacts_dir, splits, model, spec))
    return stats["tokens"], stats["steps"]


def run_plain_trl(model: ModelSpec, rows: list[dict], spec: TrainSpec, out_dir: Path) -> tuple[int, float]:
    """Real tokens and seconds of `trainer.train()` in a plain TRL SFT script with the same settings
    (LoRA, or QLoRA: the base loaded in 4 bits through transformers' BitsAndBytesConfig, as TRL's
    documentation does it)."""
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
    return int(tokens), seconds


class Lockstep:
    """Trainings in processes of their own that take turns optimizer step by optimizer step: one
    works while the others wait, so the drifting speed of a shared machine falls on all alike.

    (Processes, not threads: a training in a second thread of a process ran 1.6x slower here.) A
    process holds the turn from its start, through loading and tokenizing, until its trainer ends
    an optimizer step, then passes it on; its clock runs only inside `trainer.train()` while it
    holds the turn: its steps, data loading, callbacks and logging, and none of another's.
    """

    def __init__(self, jobs: dict[str, Callable[[], tuple[int, float]]], warm_up: Callable[[str], object]):
        self.names = list(jobs)
        self.jobs = jobs
        self.warm_up = warm_up  # called with the job's name first: an untimed training (kernels, imports)
        context = multiprocessing.get_context("spawn")
        self._cond = context.Condition()
        self._turn = context.Value("i", 0, lock=False)
        self._alive = context.Array("b", [1] * len(jobs), lock=False)
        self._ready = context.Barrier(len(jobs))
        self._results = context.Queue()

    def run(self) -> dict[str, tuple[int, float]]:
        """(real tokens trained, seconds in turn) by job name."""
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=self._take_part, args=(index,), name=name, daemon=True)
            for index, name in enumerate(self.names)
        ]
        for process in processes:
            process.start()
        results: dict[str, tuple[int, float]] = {}
        while len(results) < len(processes):
            try:
                name, tokens, seconds, error = self._results.get(timeout=5)
            except queue.Empty:
                if dead := [p for p in processes if p.exitcode not in (None, 0)]:
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}") from None
                continue
            if error:
                raise RuntimeError(f"{name} failed: {error}")
            results[name] = (tokens, seconds)
        for process in processes:
            process.join()
        return results

    def _take_part(self, index: int) -> None:
        """In the job's process: warm up, wait for all, then train in turns."""
        name = self.names[index]
        self.warm_up(name)
        clock = _Clock()
        _train_in_turns(lambda: self._pass_turn(index, clock), clock)
        self._ready.wait()
        self._wait_for_turn(index)
        try:
            tokens = self.jobs[name]()[0]
            self._results.put((name, tokens, clock.seconds, None))
        except BaseException as error:
            self._results.put((name, None, None, repr(error)))
        finally:
            with self._cond:
                self._alive[index] = 0
                self._advance(index)

    def _pass_turn(self, index: int, clock: _Clock) -> None:
        clock.stop()
        with self._cond:
            self._advance(index)
        self._wait_for_turn(index)
        clock.start()

    def _advance(self, index: int) -> None:
        """The turn to the next living one after `index` (called holding the condition's lock)."""
        count = len(self.names)
        for step in range(1, count + 1):
            if self._alive[(index + step) % count]:
                self._turn.value = (index + step) % count
                break
        self._cond.notify_all()

    def _wait_for_turn(self, index: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn.value == index)


class _Clock:
    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None


def _train_in_turns(pass_turn: Callable[[], None], clock: _Clock) -> None:
    """Every SFTTrainer of this process (Tuneline's or the plain script's) times its `train()` on
    `clock` and calls `pass_turn` at the end of each optimizer step."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class TurnCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            pass_turn()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            clock.stop()

    original = SFTTrainer.train

    def train(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        self.add_callback(TurnCallback())  # last, so a step's own callbacks run in its turn
        return original(self, *args, **kwargs)

    SFTTrainer.train = train


def warm_up_trl(model: ModelSpec, rows: list[dict], spec: TrainSpec, root: Path, name: str) -> None:
    """Two steps of the plain script: a process's first training pays one-time costs."""
    run_plain_trl(model, rows, spec.model_copy(update={"max_steps": 2}), root / f"warm-up-{name}")


def tokens_per_example(rows: list[dict], model: ModelSpec) -> float:
    """Mean tokens of a formatted conversation (what a padded batch holds, per row, without padding)."""
    tokenizer = models.load_tokenizer(model)
    return statistics.mean(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="Rounds; each ratio is printed.")
    parser.add_argument("--out", type=Path, help="Also write the results to this file.")
    parser.add_argument(
        "--control",
        action="store_true",
        help="A second plain TRL training instead of packing: the TRL/TRL ratio is the noise floor.",
    )
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"tuneline": [], "trl": [], "packing": [], "trl-control": []}
    orders: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits, model, rows = make_data(root, args.records, seed=0)
        spec = spec_for(args)
        # Packed rows of max_length tokens, as many per step as the padded batches hold real tokens:
        # the same work per optimizer step, without the padding. (Without a varlen attention kernel,
        # as on CPU, each packed row stays its own row of the batch: tuneline/train/packing.py.)
        rows_per_step = max(1, round(tokens_per_example(rows, model) * args.batch_size / args.max_length))
        packed = spec_for(args, packing=True, batch_size=rows_per_step)
        warm_up = partial(warm_up_trl, model, rows, spec, root)
        for attempt in range(args.repeat):
            jobs = {
                "tuneline": partial(run_tuneline, root / f"art-{attempt}", splits, model, spec),
                "trl": partial(run_plain_trl, model, rows, spec, root / f"trl-{attempt}"),
                "packing": partial(run_tuneline, root / f"pack-{attempt}", splits, model, packed),
            }
            if args.control:  # the same script twice: how far two identical trainings differ here
                del jobs["packing"]
                jobs["trl-control"] = partial(run_plain_trl, model, rows, spec, root / f"control-{attempt}")
            # The turn order rotates every round, so no training always takes its step right after
            # the same other one (other shapes in the caches and the allocator).
            names = list(jobs)[attempt % 3 :] + list(jobs)[: attempt % 3]
            orders.append(" > ".join(names))
            results = Lockstep({name: jobs[name] for name in names}, warm_up=warm_up).run()
            for name, (tokens, seconds) in results.items():
                rates[name].append(tokens / seconds)

    def ratios(mine: str, baseline: str, goal: float | None) -> str:
        each = [a / b for a, b in zip(rates[mine], rates[baseline], strict=True)]
        listed = ", ".join(f"{ratio:.3f}" for ratio in each)
        aim = f"goal >= {goal}" if goal else "identical trainings: 1.0 but for noise"
        return f"{statistics.median(each):9.3f}   ({aim}); each round {listed}"

    def rate(name: str) -> str:
        return f"{statistics.median(rates[name]):9.1f} tokens/s"

    device, _ = models.choose_device()
    lines = [
        f"train throughput: tiny Llama (hidden 256, 4 layers), LoRA r16, {args.records} mixed-length records,"
        f" {args.steps} steps, batch {args.batch_size} (packed: {rows_per_step} rows), max_length "
        f"{args.max_length}, device {device}; the three trainings take turns step by step, "
        f"medians of {args.repeat} rounds; load average {os.getloadavg()[0]:.2f}",
        f"tuneline train stage : {rate('tuneline')}",
        f"plain TRL script     : {rate('trl')}",
        f"ratio tuneline/TRL   : {ratios('tuneline', 'trl', 1.0)}",
        *(
            [f"ratio TRL/TRL control: {ratios('trl-control', 'trl', None)}"]
            if args.control
            else [
                f"packing (tuneline)   : {rate('packing')}",
                f"ratio packing/padding: {ratios('packing', 'tuneline', 1.5)}",
            ]
        ),
        f"turn order per round : {'; '.join(orders)}",
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
