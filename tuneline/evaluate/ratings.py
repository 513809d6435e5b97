"""Ratings from pairwise outcomes, computed as Chatbot Arena computes them.

A battle is one comparison: `model_a`, `model_b` and `winner` ("model_a", "model_b" or "tie").

- `elo_ratings`: online Elo in the battles' order (each starts at 1000; K points per upset).
  Order-dependent by design: it shows how the ratings moved as comparisons came in.
- `bradley_terry`: the order-free maximum-likelihood fit, P(a beats b) = 1 / (1 + 10^((R_b - R_a)/400)),
  on the pairwise win counts with a tie counting as half a win for each side. Arena's notebook
  fits it as a logistic regression (scikit-learn); this minimizes the same likelihood with scipy's
  BFGS and its exact gradient, as FastChat's newer Bradley-Terry code does (`bt_loss_and_grad`):
  several times faster per fit, and the bootstrap fits hundreds of times. A difference of 400
  points means 10:1 odds; 191 points, 3:1.
- `bootstrap_intervals`: the fit repeated on battles resampled with replacement; the 2.5% and
  97.5% quantiles of each model's rating are its 95% interval.
- `leaderboard`: all of it per model, best Bradley-Terry rating first.

A model that won (or lost) every game has no finite maximum-likelihood rating (Arena's fit drifts
until its iteration limit): there the weak L2 prior `SEPARATED_PRIOR` keeps it finite, a few hundred
points from its opponents. Ratings of models with mixed results are the plain maximum likelihood.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import numpy as np

Winner = Literal["model_a", "model_b", "tie"]
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
# The L2 prior's strength on ratings in units of 400 points, used only when some model never won or
# never lost: a model that won 10 of 10 games is rated ~590 points above its opponent.
SEPARATED_PRIOR = 1.0
SCORE = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}  # model_a's share of one battle


class Battle(TypedDict):
    """One pairwise outcome, in Arena's column names."""

    model_a: str
    model_b: str
    winner: Winner


def elo_ratings(
    battles: Sequence[dict[str, Any]], k_factor: float = 32.0, init: float = INIT_RATING
) -> dict[str, float]:
    """Online Elo over the battles in order: after each, both ratings move by K x (score - expected)."""
    rating: dict[str, float] = defaultdict(lambda: init)
    for battle in battles:
        a, b = battle["model_a"], battle["model_b"]
        expected_a = 1 / (1 + BASE ** ((rating[b] - rating[a]) / SCALE))
        score_a = SCORE[battle["winner"]]
        rating[a] += k_factor * (score_a - expected_a)
        rating[b] += k_factor * ((1 - score_a) - (1 - expected_a))
    return dict(rating)


def win_matrix(battles: Sequence[dict[str, Any]], models: list[str]) -> np.ndarray:
    """wins[i, j]: how often model i beat model j, a tie counting half for each side."""
    index = {name: i for i, name in enumerate(models)}
    first = np.array([index[b["model_a"]] for b in battles], dtype=int)
    second = np.array([index[b["model_b"]] for b in battles], dtype=int)
    score = np.array([SCORE[b["winner"]] for b in battles])
    return _wins(first, second, score, len(models))


def _wins(first: np.ndarray, second: np.ndarray, score: np.ndarray, size: int) -> np.ndarray:
    wins = np.zeros((size, size))
    np.add.at(wins, (first, second), score)
    np.add.at(wins, (second, first), 1.0 - score)
    return wins


def fit_ratings(wins: np.ndarray) -> np.ndarray:
    """The Bradley-Terry maximum-likelihood ratings (Elo scale, mean 1000) of a win matrix:
    minimize -sum_ij wins[i, j] * log P(i beats j), P = 1 / (1 + 10^((R_j - R_i)/400)), with
    scipy's BFGS and the exact gradient. The weak prior applies only when some model never
    won or never lost (no finite maximum otherwise)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    separated = bool(((wins.sum(axis=1) == 0) | (wins.sum(axis=0) == 0)).any())
    prior = SEPARATED_PRIOR if separated else 0.0
    step = math.log(BASE)  # ratings in units of SCALE points: P(i beats j) = sigmoid(step * (w_i - w_j))

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        margin = step * (w[:, None] - w[None, :])
        value = float(np.sum(wins * np.logaddexp(0.0, -margin))) + 0.5 * prior * float(w @ w)
        pull = wins * expit(-margin)  # d(-log P(i beats j)) / d(margin), negated
        return value, step * (pull.sum(axis=0) - pull.sum(axis=1)) + prior * w

    fitted = minimize(loss, np.zeros(len(wins)), jac=True, method="BFGS", options={"gtol": 1e-9})
    return SCALE * (fitted.x - fitted.x.mean()) + INIT_RATING


def bradley_terry(battles: Sequence[dict[str, Any]], models: list[str] | None = None) -> dict[str, float]:
    """Bradley-Terry ratings (mean 1000 on the Elo scale) of every model in `battles`."""
    models = models or model_names(battles)
    if len(models) < 2:
        return dict.fromkeys(models, INIT_RATING)
    fitted = fit_ratings(win_matrix(battles, models))
    return {name: float(value) for name, value in zip(models, fitted, strict=True)}


def bootstrap_intervals(
    battles: Sequence[dict[str, Any]], rounds: int, seed: int = 0, models: list[str] | None = None
) -> dict[str, tuple[float, float]]:
    """95% intervals of each model's Bradley-Terry rating: the fit on `rounds` resamplings of the
    battles (with replacement), 2.5% and 97.5% quantiles."""
    models = models or model_names(battles)
    index = {name: i for i, name in enumerate(models)}
    first = np.array([index[b["model_a"]] for b in battles], dtype=int)
    second = np.array([index[b["model_b"]] for b in battles], dtype=int)
    score = np.array([SCORE[b["winner"]] for b in battles])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        picked = rng.integers(0, len(battles), size=len(battles))
        samples.append(fit_ratings(_wins(first[picked], second[picked], score[picked], len(models))))
    low, high = np.quantile(np.array(samples), [0.025, 0.975], axis=0)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(models, low, high, strict=True)}


def model_names(battles: Sequence[dict[str, Any]]) -> list[str]:
    """Every model in the battles, sorted."""
    return sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})


def leaderboard(
    battles: Sequence[dict[str, Any]], k_factor: float = 32.0, rounds: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per model (model, elo, bt, ci_low, ci_high, games), best Bradley-Terry rating first;
    ratings rounded to a point."""
    if not battles:
        return []
    models = model_names(battles)
    elo = elo_ratings(battles, k_factor)
    fitted = bradley_terry(battles, models)
    intervals = bootstrap_intervals(battles, rounds, seed, models)
    games = Counter(name for b in battles for name in (b["model_a"], b["model_b"]))
    rows = [
        {
            "model": name,
            "elo": round(elo[name], 1),
            "bt": round(fitted[name], 1),
            "ci_low": round(intervals[name][0], 1),
            "ci_high": round(intervals[name][1], 1),
            "games": games[name],
        }
        for name in models
    ]
    return sorted(rows, key=lambda row: (-row["bt"], row["model"]))
