"""The run report's cross-stage ledger check, with and without the augment stage between collect and clean."""

from __future__ import annotations

import pytest

from tuneline.report import build_report, render_markdown, reuse_line
from tuneline.store import LedgerError, find_stage, write_stage


def make_stage(root, name, count_in, out, stats=None):
    with write_stage(root, name, name) as writer:
        for n in range(count_in):
            writer.count_in()
            if n < out:
                writer.keep({"n": n})
            else:
                writer.drop({"n": n}, "test_drop", "dropped by the test")
        writer.stats = stats or {}
    return find_stage(root, name, name)


def test_funnel_runs_collect_augment_clean(tmp_path):
    collected = make_stage(tmp_path, "collect", 10, 9)
    augmented = make_stage(tmp_path, "augment", 9 + 20, 9 + 15, {"collected": 9, "generated": 20})
    cleaned = make_stage(tmp_path, "clean", 24, 20)
    report = build_report({"collect": collected, "augment": augmented, "clean": cleaned})
    assert [(row["stage"], row["in"], row["out"]) for row in report["funnel"]] == [
        ("collect", 10, 9),
        ("augment", 29, 24),
        ("clean", 24, 20),
    ]


def test_augment_that_lost_collected_records_fails_the_report(tmp_path):
    collected = make_stage(tmp_path, "collect", 10, 9)
    augmented = make_stage(tmp_path, "augment", 8 + 20, 8 + 15, {"collected": 8, "generated": 20})
    with pytest.raises(LedgerError, match="augment took in 8 collected records but collect gave it 9"):
        build_report({"collect": collected, "augment": augmented})


def test_clean_must_take_what_augment_gave(tmp_path):
    collected = make_stage(tmp_path, "collect", 10, 9)
    augmented = make_stage(tmp_path, "augment", 29, 24, {"collected": 9, "generated": 20})
    cleaned = make_stage(tmp_path, "clean", 9, 9)  # read collect's output instead of augment's
    with pytest.raises(LedgerError, match="clean took in 9 records but augment gave it 24"):
        build_report({"collect": collected, "augment": augmented, "clean": cleaned})


def test_the_report_says_which_stages_were_reused(tmp_path):
    collected = make_stage(tmp_path, "collect", 10, 9)
    cleaned = make_stage(tmp_path, "clean", 9, 9)
    stages = {"collect": collected, "clean": cleaned}

    before = build_report(stages, started_at="2000-01-01T00:00:00+00:00")  # a run older than both
    assert before["reused"] == [] and reuse_line(before) == "Every stage ran (2)."
    after = build_report(stages, started_at="2999-01-01T00:00:00+00:00")  # both came from earlier runs
    assert after["reused"] == ["collect", "clean"]
    assert reuse_line(after) == "Every stage was reused (2): nothing changed since an earlier run."
    assert "Every stage was reused" in render_markdown(after)
    partly = {**after, "reused": ["collect"]}
    assert reuse_line(partly) == "Reused from earlier runs: collect; ran: clean."


def test_the_report_shows_selection_benchmarks_judge_and_peoples_ratings():
    report = {
        "funnel": [],
        "stage_dirs": {},
        "selection": {
            "rule": {"metric": "exact_match", "few_shot": 3},
            "candidates": [
                {
                    "name": "smollm2.gguf",
                    "metrics": {"few_shot_exact_match": 0.125},
                    "params": 134515008,
                    "train_memory_gb": 1.875,
                    "tokens_per_second": 4.9,
                    "chosen": True,
                    "reason": "best",
                },
            ],
        },  # fmt: skip
        "benchmarks": {
            "tasks": {"arc_easy": {"metric": "acc_norm", "base": 0.52, "tuned": 0.505, "change": -0.015}}
        },
        "judge": {"pairs": {"base": {"wins": 9, "losses": 1, "ties": 0, "win_rate": 0.9}}},
        "people": {
            "pairs": {"champion": {"wins": 2, "losses": 2, "ties": 1, "win_rate": 0.5}},
            "leaderboard": [
                {
                    "model": "tuned:abc",
                    "bt": 1256.4,
                    "ci_low": 1169,
                    "ci_high": 1344,
                    "elo": 1147,
                    "games": 20,
                }
            ],
        },  # fmt: skip
    }
    text = render_markdown(report)
    assert "| smollm2.gguf | 0.125 | 134,515,008 | 1.88 | 4.900 | yes | best |" in text
    assert "| arc_easy | acc_norm | 52.0 | 50.5 | -1.5 |" in text
    assert "## Judge: the tuned model against" in text and "| base | 9 | 1 | 0 | 0.900 |" in text
    assert "## People: the tuned model against" in text and "| champion | 2 | 2 | 1 | 0.500 |" in text
    assert "| tuned:abc | 1256 (1169-1344) | 1147 | 20 |" in text
