"""Benchmark: the quickstart's first run against a second, cached run of the unchanged recipe.

Runs `tuneline quickstart` twice in a fresh copy of the project's recipes (so nothing cached from
earlier runs counts), then `tuneline run` with one training hyper-parameter changed, and prints
each wall time and the ratios. Goal: the cached run takes a small fraction of the first.

    python bench/quickstart_cache.py
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNELINE = [sys.executable, "-m", "tuneline.cli.main"]


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(ROOT / "recipes", project / "recipes")
        first = timed([*TUNELINE, "quickstart"], project)
        cached = timed([*TUNELINE, "quickstart"], project)
        changed = timed([*TUNELINE, "run", "recipes/quickstart.yaml", "train.learning_rate=0.0015"], project)
    print(f"first run (builds the tiny model, trains): {first:7.1f} s")
    print(f"second run, unchanged recipe (all cached):  {cached:7.1f} s   ratio {cached / first:.3f}")
    print(f"train.learning_rate changed (train+after):  {changed:7.1f} s   ratio {changed / first:.3f}")


if __name__ == "__main__":
    main()
