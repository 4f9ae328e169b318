"""medsearch.train.select: a trained candidate is chosen only beyond the noise, ties go to the simpler one."""

from __future__ import annotations

import numpy as np
import pytest

from medsearch.errors import ConfigError
from medsearch.train.select import Candidate, choose, pool_rows, score_queries

RNG = np.random.default_rng(0)
N = 400
FROZEN = (RNG.random(N) < 0.7).astype(float)


def _better(p_flip: float, seed: int) -> np.ndarray:
    """FROZEN with a share of its misses turned into hits (paired: the same queries)."""
    rng = np.random.default_rng(seed)
    return np.where((FROZEN == 0) & (rng.random(N) < p_flip), 1.0, FROZEN)


def _noise(seed: int) -> np.ndarray:
    """FROZEN with as many hits lost as misses won: no gain but noise."""
    rng = np.random.default_rng(seed)
    flip = rng.random(N) < 0.1
    return np.where(flip, 1.0 - FROZEN, FROZEN)


def _reshuffled(values: np.ndarray, lost: int, won: int, seed: int) -> np.ndarray:
    """``values`` with ``lost`` hits turned into misses and ``won`` misses into hits: a gain of both signs."""
    rng = np.random.default_rng(seed)
    out = values.copy()
    out[rng.choice(np.flatnonzero(values == 1), lost, replace=False)] = 0.0
    out[rng.choice(np.flatnonzero(values == 0), won, replace=False)] = 1.0
    return out


LINEAR = _better(0.35, 4)


def _c(name: str, values: np.ndarray) -> Candidate:
    return Candidate(name, {"map_hits@5": values})


# (id, candidates after frozen, the one chosen, a phrase of the verdict)
CASES = [
    ("clear gain", [("adapter-linear", _better(0.4, 1))], "adapter-linear", "adapter-linear beats the frozen encoder"),
    ("noise only", [("adapter-linear", _noise(2)), ("adapter-mlp", _noise(3))], "frozen", "no candidate beats the frozen encoder by more than the noise"),
    ("equal to frozen", [("adapter-linear", FROZEN.copy())], "frozen", "no candidate beats the frozen encoder"),
    ("both gain, within noise of each other", [("adapter-linear", LINEAR), ("adapter-mlp", _reshuffled(LINEAR, 10, 14, 5))],
     "adapter-linear", "not beyond the noise, so the simpler one is kept"),
    ("fine-tuned far ahead of the adapter", [("adapter-linear", _better(0.15, 6)), ("fine-tuned", _better(0.95, 7))],
     "fine-tuned", "fine-tuned beats the frozen encoder"),
    ("a better mean that is only noise loses to a small sure gain",
     [("adapter-linear", _reshuffled(FROZEN, 0, 8, 8)), ("adapter-mlp", _reshuffled(FROZEN, 25, 36, 9))],
     "adapter-linear", "adapter-linear beats"),
]


@pytest.mark.parametrize(("trained", "chosen", "phrase"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_choice(trained, chosen, phrase):
    candidates = [_c("frozen", FROZEN)] + [_c(n, v) for n, v in trained]
    choice = choose(candidates, "map_hits@5", seed=0)
    assert choice.chosen.name == chosen, choice.verdict
    assert phrase in choice.verdict and "\n" not in choice.verdict
    rows = {r["candidate"]: r for r in choice.table}
    assert [r["chosen"] for r in choice.table].count(True) == 1 and rows[chosen]["chosen"]
    for r in choice.table[1:]:
        low, high = r["gain_interval"]
        assert low <= r["gain_over_frozen"] <= high
        # a candidate that beats frozen has its whole (Bonferroni-widened) interval above zero
        assert r["beats_frozen"] == (low > 0)
        assert r["gain_confidence"] == pytest.approx(1 - 0.05 / len(trained))


def test_only_frozen():
    choice = choose([_c("frozen", FROZEN)], "map_hits@5")
    assert choice.frozen_chosen and "only the frozen encoder" in choice.verdict


@pytest.mark.parametrize(("candidates", "match"), [
    ([_c("adapter-linear", FROZEN)], "first candidate must be the frozen encoder"),
    ([_c("frozen", FROZEN), _c("adapter-mlp", FROZEN[:10])], "no per-query map_hits@5 values"),
    ([_c("frozen", FROZEN), Candidate("fine-tuned", {"hit@1": FROZEN})], "no per-query map_hits@5 values"),
])
def test_bad_candidates_raise(candidates, match):
    with pytest.raises(ConfigError, match=match):
        choose(candidates, "map_hits@5")


def test_scoring_matches_a_hand_computed_search():
    gallery = np.eye(3, dtype=np.float32)
    labels = np.array([0, 1, 1])
    queries = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]], dtype=np.float32)
    values = score_queries(gallery, labels, queries, np.array([0, 0]), n_classes=2)
    # k is capped by the gallery (3): only hit@1 is scored; the first query's nearest is class 0
    assert list(values) == ["hit@1"] and values["hit@1"].tolist() == [1.0, 0.0]


def test_pooling_is_the_index_pooling():
    rows = np.array([[1, 0], [0, 1], [3, 4]], dtype=np.float32)
    pooled = pool_rows(rows, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(pooled, [[0.70710677, 0.70710677], [0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(pool_rows(rows, np.array([0, 0, 1]), 2, "max"), [[0.70710677, 0.70710677], [0.6, 0.8]], rtol=1e-6)
