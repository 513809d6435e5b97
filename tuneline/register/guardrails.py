"""Guardrails: checks that can refuse a promotion even when the primary metric wins.

Each guardrail the recipe sets (`register.guardrails`) reads what an earlier stage measured:
- `max_regression`: no benchmark (the benchmarks stage, lm-evaluation-harness) may drop more than
  this many points from the base model to the tuned one: the "did it forget" check;
- `min_suite_pass_rate`: the tuned model's pass rate over the test suites (evaluate stage);
- `min_judge_win_rate` / `min_human_win_rate`: the tuned model's win rate against every opponent
  the judge or people compared it with (base, champion); a tie counts half.

A guardrail whose evidence is missing fails: a check that did not run never lets a model through.
No MLflow here: the register stage passes the stats and writes the results on the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneline.recipe import Guardrails


@dataclass(frozen=True)
class Check:
    """One guardrail's verdict: its name, whether it passed, and the figures behind it."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        """The check as one line of the run report and the version's tags."""
        return f"{self.name}: {'passed' if self.passed else 'FAILED'} ({self.detail})"


def check_guardrails(spec: Guardrails, evidence: dict[str, dict[str, Any]]) -> list[Check]:
    """The verdict of every guardrail `spec` sets; `evidence` maps a stage name (evaluate,
    benchmarks, judge, compare) to its stats."""
    checks = []
    if spec.max_regression is not None:
        checks.append(benchmark_check(spec.max_regression, evidence.get("benchmarks")))
    if spec.min_suite_pass_rate is not None:
        checks.append(suite_check(spec.min_suite_pass_rate, evidence.get("evaluate")))
    if spec.min_judge_win_rate is not None:
        checks.append(win_rate_check("judge", spec.min_judge_win_rate, evidence.get("judge")))
    if spec.min_human_win_rate is not None:
        checks.append(win_rate_check("human", spec.min_human_win_rate, evidence.get("compare")))
    return checks


def benchmark_check(max_regression: float, stats: dict[str, Any] | None) -> Check:
    """Every benchmark's change from base to tuned (shares; reported in points) is above
    -max_regression points."""
    name = "max_regression"
    tasks = (stats or {}).get("tasks") or {}
    if not tasks:
        return Check(name, False, "no benchmark scores: set evaluate.benchmarks")
    drops, unscored = [], []
    for task, row in sorted(tasks.items()):
        if row.get("base") is None or row.get("tuned") is None:
            unscored.append(task)
            continue
        change = 100 * (row["tuned"] - row["base"])
        if change < -max_regression - 1e-9:
            drops.append(f"{task} {100 * row['base']:.1f} -> {100 * row['tuned']:.1f} ({change:+.1f} points)")
    if unscored:
        return Check(name, False, f"no score for {', '.join(unscored)}")
    if drops:
        return Check(name, False, f"dropped more than {max_regression:g} points: {'; '.join(drops)}")
    worst = min(100 * (row["tuned"] - row["base"]) for row in tasks.values())
    return Check(name, True, f"{len(tasks)} benchmark(s), worst change {worst:+.1f} points")


def suite_check(floor: float, stats: dict[str, Any] | None) -> Check:
    """The tuned model's test-suite pass rate is at least `floor`."""
    name = "min_suite_pass_rate"
    rate = ((stats or {}).get("tuned") or {}).get("suite_pass_rate")
    if rate is None:
        return Check(name, False, "no test-suite pass rate: set evaluate.suites")
    passed = rate >= floor - 1e-9
    return Check(name, passed, f"tuned pass rate {rate:.3f} {'>=' if passed else '<'} {floor:g}")


def win_rate_check(rater: str, floor: float, stats: dict[str, Any] | None) -> Check:
    """The tuned model's win rate against each opponent `rater` compared it with is at least `floor`."""
    name = f"min_{rater}_win_rate"
    pairs = {opponent: row for opponent, row in ((stats or {}).get("pairs") or {}).items() if row}
    rates = {opponent: row.get("win_rate") for opponent, row in pairs.items()}
    if not rates or any(rate is None for rate in rates.values()):
        source = "evaluate.judge" if rater == "judge" else "evaluate.human"
        return Check(name, False, f"no {rater} verdicts to count: set {source}")
    low = [f"vs {opponent} {rate:.3f}" for opponent, rate in sorted(rates.items()) if rate < floor - 1e-9]
    shown = ", ".join(f"vs {opponent} {rate:.3f}" for opponent, rate in sorted(rates.items()))
    if low:
        return Check(name, False, f"win rate below {floor:g}: {', '.join(low)}")
    return Check(name, True, f"win rate {shown} >= {floor:g}")
