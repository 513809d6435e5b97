"""Benchmark: the quickstart's first run against a second, cached run of the unchanged recipe.

Runs `tuneline quickstart` twice in a fresh copy of the project's recipes (so nothing cached from
earlier runs counts): the second run reuses every stage and the Prefect server the first one left
up. Then once more after `tuneline server stop` (a cached run that has to start a server, as after
the server's idle timeout), then `tuneline run` with one training hyper-parameter changed, and
prints each wall time and the ratios. Goal: the cached run takes at most a tenth of the first.

Then it accounts for the cached run's time, part by part, in this process: starting Python and
importing the CLI, reaching the running Prefect server (the CLI imports the flow meanwhile),
importing the flow, and the flow itself with every stage reused.

    python bench/quickstart_cache.py
"""

import os
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


def cached_run_parts(project: Path) -> dict[str, float]:
    """Seconds of each part of a cached run, measured one by one in this process."""
    parts = {"python start + CLI import": timed([sys.executable, "-c", "import tuneline.cli.main"], project)}
    os.chdir(project)
    from tuneline.cli.main import quiet_environment
    from tuneline.recipe import load_recipe

    recipe = load_recipe("recipes/quickstart.yaml")
    home = Path(recipe.artifacts_dir).resolve() / "prefect"
    quiet_environment(home)
    from tuneline.flows.server import local_prefect_server

    start = time.perf_counter()
    with local_prefect_server(home) as api_url:
        parts["reach the running Prefect server"] = time.perf_counter() - start
        from prefect.logging.handlers import APILogHandler
        from prefect.settings import PREFECT_API_URL, temporary_settings

        start = time.perf_counter()
        from tuneline.flows.finetune import finetune

        parts["flow import"] = time.perf_counter() - start
        with temporary_settings({PREFECT_API_URL: api_url}):
            start = time.perf_counter()
            report = finetune(recipe)
            parts["flow run, every stage reused"] = time.perf_counter() - start
            APILogHandler().flush()  # before the server stops
        assert len(report["reused"]) == len(report["stage_dirs"]), report["reused"]
        start = time.perf_counter()
    parts["release the server"] = time.perf_counter() - start
    return parts


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(ROOT / "recipes", project / "recipes")
        first = timed([*TUNELINE, "quickstart"], project)
        cached = timed([*TUNELINE, "quickstart"], project)
        subprocess.run([*TUNELINE, "server", "stop"], cwd=project, check=True, stdout=subprocess.DEVNULL)
        cold = timed([*TUNELINE, "quickstart"], project)
        changed = timed([*TUNELINE, "run", "recipes/quickstart.yaml", "train.learning_rate=0.0015"], project)
        parts = cached_run_parts(project)
        subprocess.run([*TUNELINE, "server", "stop"], cwd=project, check=True, stdout=subprocess.DEVNULL)
    print(f"first run (builds the tiny model, trains): {first:7.1f} s")
    print(f"second run, unchanged recipe (all cached):  {cached:7.1f} s   ratio {cached / first:.3f}")
    print(f"again, after `tuneline server stop`:        {cold:7.1f} s   ratio {cold / first:.3f}")
    print(f"train.learning_rate changed (train+after):  {changed:7.1f} s   ratio {changed / first:.3f}")
    print("the cached run, part by part (measured separately):")
    for name, seconds in parts.items():
        print(f"  {name:45s} {seconds:6.2f} s")
    rest = cached - sum(parts.values())
    print(f"  {'the rest (printing the report, Python exit)':45s} {rest:6.2f} s   (by subtraction)")


if __name__ == "__main__":
    main()
