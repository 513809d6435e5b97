"""Benchmark: clean + near-dedup + quality gate over a million records, memory kept flat.

Builds a collected stage of N records (default 1,000,000) from the self-instruct T0 55k file
(prompt/completion pairs): the originals, then copies with small perturbations (a word dropped,
one replaced, a suffix) so exact and near-dedup both have work. Then, each in a child process
so its peak memory (ru_maxrss) is its own:

  baseline   read the stage's records.jsonl and json-parse every line (the floor for any stage)
  clean      run_clean with the default CleanSpec (repairs, structure, PII, exact + near-dedup)
  gate       run_gate with the conversations suite over the cleaned records

Prints records/s, peak memory and the ratio to the baseline, plus the near-duplicate pairs
found in the original 55k file. Usage:

    python bench/clean_scale.py [--records 1000000] [--work /tmp/tuneline-bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct" / "t0_train_55k.jsonl.gz"


def load_pairs() -> list[tuple[str, str]]:
    with gzip.open(SOURCE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [(row["prompt"], row["completion"]) for row in rows]


def perturb(text: str, rng: random.Random, copy: int) -> str:
    words = text.split(" ")
    if len(words) > 3:
        index = rng.randrange(len(words))
        if copy % 3 == 0:
            del words[index]
        else:
            words[index] = rng.choice(("the", "a", "this", "that", "one"))
    return " ".join(words) + ("" if copy % 2 else f" ({copy})")


def build(work: Path, count: int) -> None:
    """A finished `collect` stage with `count` records (originals first, then perturbed copies)."""
    from tuneline.records import make_record
    from tuneline.store import write_stage

    pairs = load_pairs()
    rng = random.Random(0)
    with write_stage(work, "collect", f"bench{count}") as writer:
        for n in range(count):
            prompt, completion = pairs[n % len(pairs)]
            copy = n // len(pairs)
            if copy:
                prompt = perturb(prompt, rng, copy)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            writer.count_in()
            writer.keep(make_record(messages, meta={"source": "t0", "origin": "collected"}))


def child(step: str, work: Path, count: int) -> None:
    from tuneline.curate.clean import run_clean
    from tuneline.curate.gate import run_gate
    from tuneline.recipe import CleanSpec, GateSpec
    from tuneline.store import find_stage, iter_records, read_manifest, read_stats

    collected = find_stage(work, "collect", f"bench{count}")
    started = time.perf_counter()
    if step == "baseline":
        n = sum(1 for _ in iter_records(collected))
        result = {"records": n}
    elif step == "clean":
        ref = run_clean(work, collected, CleanSpec())
        result = {"ledger": read_manifest(ref)["ledger"], **read_stats(ref)}
    else:
        cleaned = run_clean(work, collected, CleanSpec())  # cached: finished by the clean step
        quality = GateSpec(min_records=10, max_chars=200_000, mostly=0.99, max_duplicate_rate=0.01)
        ref = run_gate(work, cleaned, quality)
        stats = read_stats(ref)
        result = {"records": stats["records"], "gate_seconds": stats["seconds"]}
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))


def measure(step: str, work: Path, count: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, __file__, "--child", step, "--work", str(work), "--records", str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_mb"] = round(max(peak_kb, before) / 1024)  # maxrss of the largest child so far
    return result


def near_pairs_in_original() -> tuple[int, float, list[tuple[str, str]]]:
    from tuneline.curate.dedup import near_duplicate_pairs
    from tuneline.recipe import CleanSpec

    spec = CleanSpec()
    texts = [f"{p}\n{c}" for p, c in load_pairs()]
    started = time.perf_counter()
    pairs = near_duplicate_pairs(
        texts, spec.near_dedup_threshold, spec.near_dedup_ngram, spec.near_dedup_permutations
    )
    seconds = time.perf_counter() - started
    examples = [(texts[a][:70], texts[b][:70]) for a, b, _ in pairs[:3]]
    return len(pairs), seconds, examples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneline-bench"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.records)
        return
    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    build(args.work, args.records)
    print(f"built {args.records:,} records in {time.perf_counter() - started:.0f} s")
    # Children run one after another, so each new peak is that child's (the baseline is smallest).
    baseline = measure("baseline", args.work, args.records)
    clean = measure("clean", args.work, args.records)
    gate = measure("gate", args.work, args.records)
    n = args.records
    total = clean["seconds"] + gate["seconds"]
    rate = n / total
    base_rate = n / baseline["seconds"]
    ledger = clean["ledger"]
    seconds, peak = baseline["seconds"], baseline["peak_mb"]
    print(f"baseline read+parse: {base_rate:,.0f} records/s ({seconds:.1f} s), peak {peak} MB")
    print(
        f"clean: {n / clean['seconds']:,.0f} records/s ({clean['seconds']:.1f} s), peak {clean['peak_mb']} MB"
    )
    print(f"  ledger in {ledger['in']:,} out {ledger['out']:,} dropped {ledger['dropped']}")
    print(f"  repaired {clean['repaired']} pii {clean['pii_redacted']}")
    rows, seconds, peak = gate["records"], gate["seconds"], gate["peak_mb"]
    print(f"gate ({rows:,} rows): {seconds:.1f} s (GE {gate['gate_seconds']} s), peak {peak} MB")
    print(f"end to end clean + near-dedup + gate: {rate:,.0f} records/s ({total:.0f} s)")
    print(f"ratio to the read+parse baseline: {rate / base_rate:.2f}")
    pairs, seconds, examples = near_pairs_in_original()
    print(
        f"near-duplicate pairs in the original 55k file (threshold 0.8, 5-grams): {pairs:,} ({seconds:.1f} s)"
    )
    for first, second in examples:
        print(f"  {first!r}\n  ~ {second!r}")


if __name__ == "__main__":
    main()
