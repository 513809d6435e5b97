"""Elo and Bradley-Terry on outcomes whose answer is known: a 3:1 record is a 191-point gap."""

from __future__ import annotations

import math

import pytest

from tuneline.evaluate.ratings import bootstrap_intervals, bradley_terry, elo_ratings, leaderboard


def games(a: str, b: str, wins: int, losses: int, ties: int = 0) -> list[dict[str, str]]:
    """`a` against `b`, alternating who is model_a (the fit must not care about the order)."""
    results = ["a"] * wins + ["b"] * losses + ["tie"] * ties
    battles = []
    for number, result in enumerate(results):
        first, second = (a, b) if number % 2 == 0 else (b, a)
        winner = "tie" if result == "tie" else ("model_a" if (result == "a") == (first == a) else "model_b")
        battles.append({"model_a": first, "model_b": second, "winner": winner})
    return battles


def odds(ratings: dict[str, float], a: str, b: str) -> float:
    """The odds of `a` beating `b` that the ratings imply."""
    return 10 ** ((ratings[a] - ratings[b]) / 400)


def test_bradley_terry_turns_a_3_to_1_record_into_3_to_1_odds_with_an_interval_around_it():
    battles = games("tuned:abc", "base:tiny", wins=90, losses=30)
    fitted = bradley_terry(battles)
    assert odds(fitted, "tuned:abc", "base:tiny") == pytest.approx(3.0, rel=1e-3)
    assert fitted["tuned:abc"] - fitted["base:tiny"] == pytest.approx(400 * math.log10(3), abs=0.5)
    assert (fitted["tuned:abc"] + fitted["base:tiny"]) / 2 == pytest.approx(1000)

    intervals = bootstrap_intervals(battles, rounds=100, seed=0)
    for model in fitted:
        low, high = intervals[model]
        assert low < fitted[model] < high
    assert intervals["tuned:abc"][0] > intervals["base:tiny"][1] - 100  # 120 games: a clear gap


def test_a_tie_counts_half_a_win_for_each_side():
    # 2 wins, 2 losses and 4 ties is an even record; 3 wins + 2 ties vs 1 loss is 4:2 = 2:1 odds
    even = bradley_terry(games("a", "b", wins=2, losses=2, ties=4))
    assert even["a"] == pytest.approx(even["b"], abs=0.1)
    assert odds(bradley_terry(games("a", "b", wins=3, losses=1, ties=2)), "a", "b") == pytest.approx(
        2.0, rel=1e-3
    )


def test_three_models_are_ordered_by_their_records_and_an_unbeaten_one_stays_finite():
    battles = [
        *games("tuned:v2", "tuned:v1", wins=14, losses=6),
        *games("tuned:v1", "base:m", wins=15, losses=5),
        *games("tuned:v2", "base:m", wins=10, losses=0),  # never lost to base
    ]
    board = leaderboard(battles, k_factor=32, rounds=50)
    assert [row["model"] for row in board] == ["tuned:v2", "tuned:v1", "base:m"]
    assert [row["games"] for row in board] == [30, 40, 30]
    assert all(math.isfinite(row["bt"]) and row["ci_low"] <= row["bt"] <= row["ci_high"] for row in board)
    assert board[0]["bt"] - board[-1]["bt"] < 1000  # the weak prior keeps "won every game" finite
    assert set(board[0]) == {"model", "elo", "bt", "ci_low", "ci_high", "games"}


def test_elo_is_online_the_same_results_in_another_order_end_elsewhere_but_rank_alike():
    early = games("a", "b", wins=0, losses=5) + games("a", "b", wins=15, losses=0)
    late = games("a", "b", wins=15, losses=0) + games("a", "b", wins=0, losses=5)
    first, second = elo_ratings(early, k_factor=32), elo_ratings(late, k_factor=32)
    assert first["a"] > first["b"] and second["a"] > second["b"]
    assert first["a"] != pytest.approx(second["a"])  # the order matters online, not in the fit
    assert first["a"] + first["b"] == pytest.approx(2000)  # zero-sum
    assert bradley_terry(early) == pytest.approx(bradley_terry(late))


def test_no_battles_make_an_empty_leaderboard():
    assert leaderboard([]) == []
