"""Benchmark: the clean stage (with near-dedup) on the local executor and on Dask with 1 and 2 workers.

Builds a collected stage from the self-instruct T0 55k prompt/completion file (the originals; with
--records above 55k, perturbed copies follow, as in bench/clean_scale.py), then cleans it three
times, each into a fresh artifacts folder:

  local      clean.executor local, clean.workers 2 (the default): the baseline
  dask x1    clean.executor dask, a local Dask cluster of 1 worker process
  dask x2    the same with 2 worker processes

Prints records/s (wall clock of run_clean, the Dask cluster's start and stop included), the CPU
seconds of this process and its worker processes together, the ratio to the local run, and
whether each Dask run kept the same records with the same drop reasons (records.jsonl,
rejects.jsonl and stats.json identical to the local run's). Usage:

    python bench/bench_clean_shards.py [--records 55000] [--batch-size 10000] [--work DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clean_scale import SOURCE, build  # noqa: E402 - the same collected records as the scale bench

RUNS = (("local", "local", 2), ("dask x1", "dask", 1), ("dask x2", "dask", 2))


def clean_once(work: Path, name: str, executor: str, workers: int, batch_size: int, count: int) -> dict:
    """Clean the collected stage into its own artifacts folder; seconds, ledger and output files."""
    from tuneline.curate.clean import run_clean
    from tuneline.recipe import CleanSpec
    from tuneline.store import find_stage, read_manifest

    collected = find_stage(work / "in", "collect", f"bench{count}")
    spec = CleanSpec(executor=executor, workers=workers, batch_size=batch_size)
    started, cpu = time.perf_counter(), cpu_seconds()
    ref = run_clean(work / name.replace(" ", ""), collected, spec)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    files = {f: ref.file(f).read_bytes() for f in ("records.jsonl", "rejects.jsonl", "stats.json")}
    return {"seconds": seconds, "cpu": cpu, "ledger": read_manifest(ref)["ledger"], "files": files}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the clean workers, either executor)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=55_000)
    parser.add_argument("--batch-size", type=int, default=10_000, help="clean.batch_size: records a shard")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneline-bench-shards"))
    args = parser.parse_args()
    if not SOURCE.exists():
        print(f"skipped: {SOURCE} is absent (the shared T0 55k file)")
        return
    shutil.rmtree(args.work, ignore_errors=True)
    build(args.work / "in", args.records)
    results = {}
    for name, executor, workers in RUNS:
        results[name] = clean_once(args.work, name, executor, workers, args.batch_size, args.records)
    local = results["local"]
    ledger = local["ledger"]
    print(f"{args.records:,} records, shards of {args.batch_size:,}; ledger out {ledger['out']:,}")
    print(f"  dropped {ledger['dropped']}")
    for name, result in results.items():
        rate = args.records / result["seconds"]
        ratio = local["seconds"] / result["seconds"]
        same = "identical" if result["files"] == local["files"] else "DIFFERENT"
        print(
            f"{name:8} {rate:8,.0f} records/s ({result['seconds']:5.1f} s, {result['cpu']:5.1f} CPU s)  "
            f"x{ratio:.2f} of local  "
            f"records, rejects, stats: {same}"
        )
    if any(r["files"] != local["files"] for r in results.values()):
        sys.exit("a Dask run differs from the local run")


if __name__ == "__main__":
    main()
