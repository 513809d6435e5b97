"""The run report: the funnel from sources to training set, checked stage by stage, and results.

The ledger is checked twice: inside each stage (records in = out + dropped) and across stages
(what one stage put out is what the next one took in), so no record goes missing between them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuneline.pipeline import (
    AUGMENT,
    BENCHMARKS,
    CLEAN,
    COLLECT,
    COMPARE,
    EVALUATE,
    GATE,
    JUDGE,
    PRETRAIN,
    REGISTER,
    SELECT,
    SPLIT,
    TRAIN,
)
from tuneline.recipe import Recipe, dump_recipe
from tuneline.store import LedgerError, StageRef, check_ledger, read_manifest, read_stats, stage_dir

# The stages whose results the report shows (stage name -> report key), besides evaluate.
RESULT_SECTIONS = {
    SELECT.name: "selection",
    BENCHMARKS.name: "benchmarks",
    JUDGE.name: "judge",
    COMPARE.name: "people",
}
# (stage, the stage that feeds it, which of the feeder's outputs it takes in)
LINKS = (
    (CLEAN.name, COLLECT.name, None),  # without augmentation
    (CLEAN.name, AUGMENT.name, None),
    (GATE.name, CLEAN.name, None),
    (SPLIT.name, GATE.name, None),
    (TRAIN.name, SPLIT.name, "train"),
    (EVALUATE.name, SPLIT.name, "test"),
)


def format_dropped(dropped: dict[str, int]) -> str:
    """Drop counts for a table cell: `reason: n, ...`, or a dash when nothing was dropped."""
    return ", ".join(f"{reason}: {n}" for reason, n in dropped.items()) or "-"


def number(value: float | None) -> str:
    """A metric for a table; None (nothing to score) shows as a dash."""
    return "-" if value is None else f"{value:.3f}"


def save_run_recipe(run_dir: Path, recipe: Recipe) -> Path:
    """Save the resolved recipe (every default written out) beside the run's report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(recipe), encoding="utf-8")
    os.replace(tmp, path)
    return path


def lineage_funnel(artifacts_dir: str | Path, ref: StageRef) -> list[dict[str, Any]]:
    """The funnel that led to a stage, first stage first, found by following each manifest's
    first input back (split <- gate <- clean <- collect): records in, out, drops by reason."""
    rows: list[dict[str, Any]] = []
    folder: Path | None = ref.dir
    while folder is not None and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        ledger = manifest["ledger"]
        rows.append(
            {
                "stage": manifest["stage"],
                "in": ledger["in"],
                "out": ledger["out"],
                "dropped": ledger["dropped"],
            }
        )
        inputs = manifest.get("inputs") or []
        folder = stage_dir(artifacts_dir, inputs[0]["stage"], inputs[0]["digest"]) if inputs else None
    return rows[::-1]


def build_report(stages: dict[str, StageRef], started_at: str | None = None) -> dict[str, Any]:
    """Funnel rows, base vs tuned metrics and the registered model, after checking the ledger.

    With `started_at` (the run's start, ISO 8601 UTC) `reused` lists the stages that finished
    before it: earlier runs' results this run found unchanged and did not compute again.
    """
    ledgers = {name: check_ledger(ref) for name, ref in stages.items()}
    split_counts = read_stats(stages[SPLIT.name])["counts"] if SPLIT.name in stages else {}
    if AUGMENT.name in ledgers and COLLECT.name in ledgers:
        # augment takes in the collected records plus the teacher's; its stats say how many of each.
        taken, gave = read_stats(stages[AUGMENT.name])["collected"], ledgers[COLLECT.name]["out"]
        if taken != gave:
            raise LedgerError(f"stage augment took in {taken} collected records but collect gave it {gave}")
    for stage, feeder, part in LINKS:
        if (
            stage not in ledgers
            or feeder not in ledgers
            or (feeder == COLLECT.name and AUGMENT.name in ledgers)
        ):
            continue
        fed = split_counts[part] if part else ledgers[feeder]["out"]
        if ledgers[stage]["in"] != fed:
            raise LedgerError(
                f"stage {stage} took in {ledgers[stage]['in']} records but {feeder} gave it {fed}"
            )
    report: dict[str, Any] = {
        "funnel": [
            {"stage": name, "in": ledger["in"], "out": ledger["out"], "dropped": ledger["dropped"]}
            for name, ledger in ledgers.items()
            if name != REGISTER.name
        ],
        "splits": split_counts,
        "stage_dirs": {name: ref.path for name, ref in stages.items()},
        "reused": [
            name
            for name, ref in stages.items()
            if started_at and read_manifest(ref)["finished_at"] < started_at
        ],
    }
    if EVALUATE.name in stages:
        report["evaluation"] = read_stats(stages[EVALUATE.name])
    if PRETRAIN.name in stages:
        pretrained = read_stats(stages[PRETRAIN.name])
        report["pretraining"] = {
            key: pretrained.get(key) for key in ("blocks", "steps", "train_loss", "seconds")
        }
    if TRAIN.name in stages:
        trained = read_stats(stages[TRAIN.name])
        report["training"] = {key: trained.get(key) for key in ("steps", "train_loss", "seconds", "device")}
    for name, key in RESULT_SECTIONS.items():
        if name in stages:
            report[key] = read_stats(stages[name])
    if REGISTER.name in stages:
        report["registry"] = read_stats(stages[REGISTER.name])
    return report


def result_tables(report: dict[str, Any]) -> list[tuple[str, list[dict[str, str]]]]:
    """(title, rows) of the model-choosing stages that ran: the base-model candidates, the
    benchmarks base vs tuned, the judge's and people's verdicts per opponent, the ratings."""
    tables = []
    if selection := report.get("selection"):
        tables.append(("Base-model candidates (validation split)", selection_rows(selection)))
    if benchmarks := report.get("benchmarks"):
        tables.append(("Benchmarks (lm-evaluation-harness, points)", benchmark_rows(benchmarks)))
    for key, rater in (("judge", "Judge"), ("people", "People")):
        if pairs := (report.get(key) or {}).get("pairs"):
            tables.append((f"{rater}: the tuned model against", pair_rows(pairs)))
    if leaderboard := (report.get("people") or {}).get("leaderboard"):
        tables.append(("Ratings from people's comparisons (95% interval)", rating_rows(leaderboard)))
    return tables


def selection_rows(selection: dict[str, Any]) -> list[dict[str, str]]:
    """A row per base-model candidate: the metric the rule ranks by, size, speed, the choice."""
    rule = selection["rule"]
    column = f"few_shot_{rule['metric']}" if rule.get("few_shot") else rule["metric"]
    return [
        {
            "candidate": row["name"],
            column: number(row["metrics"].get(column)),
            "params": f"{row['params']:,}",
            "train memory GB": f"{row['train_memory_gb']:.2f}",
            "tokens/s": number(row["tokens_per_second"]),
            "chosen": "yes" if row["chosen"] else "",
            "why": row["reason"],
        }
        for row in selection["candidates"]
    ]


def benchmark_rows(benchmarks: dict[str, Any]) -> list[dict[str, str]]:
    """A row per lm-eval task: its metric, base and tuned in points, and the change."""
    return [
        {
            "task": task,
            "metric": row["metric"],
            "base": points(row.get("base")),
            "tuned": points(row.get("tuned")),
            "change": points(row.get("change"), signed=True),
        }
        for task, row in benchmarks["tasks"].items()
    ]


def pair_rows(pairs: dict[str, Any]) -> list[dict[str, str]]:
    """A row per opponent of the tuned model (base, champion): wins, losses, ties, win rate."""
    return [
        {"opponent": opponent}
        | {key: str(row.get(key, 0)) for key in ("wins", "losses", "ties")}
        | {"win rate": number(row.get("win_rate"))}
        for opponent, row in pairs.items()
    ]


def rating_rows(leaderboard: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A row per rated model: Bradley-Terry with its interval, Elo, games."""
    return [
        {
            "model": row["model"],
            "Bradley-Terry": f"{row['bt']:.0f} ({row['ci_low']:.0f}-{row['ci_high']:.0f})",
            "Elo": f"{row['elo']:.0f}",
            "games": str(row["games"]),
        }
        for row in leaderboard
    ]


def points(share: float | None, signed: bool = False) -> str:
    """A share (0..1) as points for a table, e.g. 0.4125 -> 41.2 (signed: +1.5); None: a dash."""
    if share is None:
        return "-"
    return f"{100 * share:+.1f}" if signed else f"{100 * share:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, for the Prefect UI and the run folder."""
    lines = ["# Tuneline run", "", reuse_line(report), "", "## Funnel", "", "| stage | in | out | dropped |"]
    lines.append("|---|---|---|---|")
    for row in report["funnel"]:
        lines.append(f"| {row['stage']} | {row['in']} | {row['out']} | {format_dropped(row['dropped'])} |")
    if evaluation := report.get("evaluation"):
        columns = score_columns(evaluation)
        lines += ["", f"## {evaluation_title(evaluation)}", "", "| model | " + " | ".join(columns) + " |"]
        lines.append("|---" * (len(columns) + 1) + "|")
        for name in scored_models(evaluation):
            scores = evaluation[name]
            lines.append(f"| {name} | " + " | ".join(number(scores.get(c)) for c in columns) + " |")
        lines += suite_lines(evaluation.get("suites"))
    for title, rows in result_tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
        lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    if registry := report.get("registry"):
        lines += [
            "",
            "## Registry",
            "",
            f"- model: `{registry['model_uri']}`",
            f"- MLflow run: `{registry['run_id']}`",
            f"- {registry_line(registry, REGISTER.name in report.get('reused', []))}",
        ]
        for check in registry.get("guardrails") or []:
            verdict = "passed" if check["passed"] else "FAILED"
            lines.append(f"- guardrail {check['name']}: {verdict} ({check['detail']})")
    return "\n".join(lines) + "\n"


def score_columns(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation table's columns: loss, the headline metric, the other chosen metrics and,
    with test suites, their pass rate (a stage written before `metrics` existed: its metric)."""
    metric = evaluation.get("metric", "exact_match")
    columns = ["loss", metric, *evaluation.get("metrics", [])]
    if evaluation.get("suites"):
        columns.append("suite_pass_rate")
    return list(dict.fromkeys(columns))


def suite_lines(suites: dict[str, Any] | None) -> list[str]:
    """Markdown for the test suites: pass rate per assertion kind, base vs tuned, and why a kind
    did not run."""
    if not suites:
        return []
    sides = scored_models(suites)
    lines = [
        "",
        f"## Test suites ({', '.join(suites['files'])})",
        "",
        f"| assertion | {' | '.join(sides)} |",
        "|---" * (len(sides) + 1) + "|",
    ]
    for kind, cells in suite_kind_rows(suites):
        lines.append(f"| {kind} | {' | '.join(cells)} |")
    failures = suites.get("tuned_failures") or []
    if not failures:
        return [*lines, "", "The tuned model failed no assertion that ran."]
    lines += [
        "",
        f"Tuned model's failed assertions (first {len(failures)}; all in `suite_failures.jsonl`):",
        "",
    ]
    return lines + [f"- {f['suite']}: {f['case']} ({f['kind']}): {f['reason']}" for f in failures]


def scored_models(scored: dict[str, Any]) -> list[str]:
    """The models an evaluate stage's stats (or their `suites`) hold, in order: base, tuned and,
    when the registry had one, champion."""
    return [name for name in ("base", "tuned", "champion") if scored.get(name)]


def evaluation_title(evaluation: dict[str, Any]) -> str:
    """The title of the scores table: which models, which split, how many examples."""
    models = "Base vs tuned"
    if "champion_version" in evaluation:
        models = f"Base, tuned and champion (v{evaluation['champion_version']})"
    return f"{models} on the test split ({evaluation.get('examples')} examples)"


def suite_kind_rows(suites: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """(assertion kind, a cell per model of `scored_models`) with `passed/run` or the reason it
    did not run."""
    sides = scored_models(suites)
    kinds = list(dict.fromkeys(kind for side in sides for kind in suites[side]["by_kind"]))

    def cell(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        run = entry["passed"] + entry["failed"]
        return f"{entry['passed']}/{run}" if run else entry.get("reason", "not run")

    return [(kind, tuple(cell(suites[side]["by_kind"].get(kind)) for side in sides)) for kind in kinds]


def registry_line(registry: dict[str, Any], reused: bool) -> str:
    """What the register stage did, from its stats: the aliases it set when it decided (not as
    the registry reads now; a later run may have moved them) and why. A stage reused from an
    earlier run is said to be one."""
    aliases = registry.get("aliases")
    if aliases is None:  # a stage written before stats listed its aliases
        aliases = ["candidate", "champion"] if registry["promoted"] else ["candidate"]
    done = ", ".join(aliases) or "none (a newer version holds candidate)"
    who = "an earlier run registered it and set" if reused else "this run set"
    return f"aliases {who}: {done} ({registry['reason']})"


def side_by_side_row(prediction: dict[str, Any]) -> dict[str, Any]:
    """One row of the evaluate stage's predictions.jsonl for a table: the prompt's last user turn,
    the reference and each model's reply (base, tuned, and champion when it was scored)."""
    prompt = prediction.get("prompt") or []
    asked = next((str(turn.get("content")) for turn in reversed(prompt) if turn.get("role") == "user"), "")
    replies = {side: prediction[side] for side in ("base", "tuned", "champion") if side in prediction}
    return {"id": prediction["id"], "prompt": asked, "reference": prediction["reference"], **replies}


def finished_before(ref: StageRef, moment: str) -> bool:
    """Whether the stage finished before `moment` (ISO 8601 UTC, to the second, as manifests say)."""
    return read_manifest(ref)["finished_at"] < moment


def reuse_line(report: dict[str, Any]) -> str:
    """Which stages this run computed and which it reused from earlier runs, in a sentence."""
    reused, stages = report.get("reused", []), list(report["stage_dirs"])
    if not reused:
        return f"Every stage ran ({len(stages)})."
    if len(reused) == len(stages):
        return f"Every stage was reused ({len(stages)}): nothing changed since an earlier run."
    ran = [name for name in stages if name not in reused]
    return f"Reused from earlier runs: {', '.join(reused)}; ran: {', '.join(ran)}."


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write report.json and report.md into the run folder, each atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", render_markdown(report))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, run_dir / name)
    return run_dir / "report.json"
