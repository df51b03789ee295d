from __future__ import annotations

import numpy as np
import pytest

from nas.pareto import hypervolume, non_dominated_ranks, pareto_mask

MIN2 = ["minimize", "minimize"]


def test_ranks_two_objectives_with_ties():
    v = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [2, 2], [6, 6]], dtype=float)
    ranks = non_dominated_ranks(v, MIN2)
    # duplicates (rows 1 and 4) share rank 0; (3,3) is dominated by (2,2); (6,6) by everything
    assert ranks.tolist() == [0, 0, 0, 1, 0, 2]


def test_nan_rows_are_excluded():
    v = np.array([[1, 1], [np.nan, 0], [2, np.inf]], dtype=float)
    assert non_dominated_ranks(v, MIN2).tolist() == [0, -1, -1]


def test_maximize_direction_is_respected():
    v = np.array([[0.9, 10], [0.95, 20], [0.8, 30]], dtype=float)
    assert pareto_mask(v, ["maximize", "minimize"]).tolist() == [True, True, False]


def test_three_objective_front():
    v = np.array([[1, 2, 3], [3, 2, 1], [2, 2, 2], [3, 3, 3], [1, 2, 4]], dtype=float)
    assert pareto_mask(v, ["minimize"] * 3).tolist() == [True, True, True, False, False]


def test_hypervolume_two_objectives_by_hand():
    # staircase of (1,3), (2,2), (3,1) under ref (4,4): 3*1 + 2*1 + 1*1 = 6
    v = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    assert hypervolume(v, MIN2, [4, 4]) == pytest.approx(6.0)
    # a dominated point and a NaN row change nothing; a point beyond the reference adds nothing
    more = np.vstack([v, [[3, 3], [np.nan, 0], [5, 0]]])
    assert hypervolume(more, MIN2, [4, 4]) == pytest.approx(6.0)


def test_hypervolume_three_objectives_by_hand():
    # two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlapping in [0,1]^3: 2 + 2 - 1 = 3
    v = np.array([[0, 1, 1], [1, 0, 1]], dtype=float)
    assert hypervolume(v, ["minimize"] * 3, [2, 2, 2]) == pytest.approx(3.0)
    # one point at the origin with ref (1,2,3) is a box of volume 6
    assert hypervolume(np.zeros((1, 3)), ["minimize"] * 3, [1, 2, 3]) == pytest.approx(6.0)


def test_hypervolume_with_maximized_accuracy():
    # accuracy (max) vs size (min); ref accuracy 0, size 100
    v = np.array([[0.9, 50], [0.5, 10]], dtype=float)
    # boxes: 0.9 x 50 and 0.5 x 90, overlap 0.5 x 50 -> 45 + 45 - 25 = 65
    assert hypervolume(v, ["maximize", "minimize"], [0.0, 100.0]) == pytest.approx(65.0)




def _brute_mask(v: np.ndarray) -> np.ndarray:
    ok = np.all(np.isfinite(v), axis=1)
    return np.array([ok[i] and not any(ok[j] and np.all(v[j] <= v[i]) and np.any(v[j] < v[i]) for j in range(len(v)))
                     for i in range(len(v))])


@pytest.mark.parametrize("seed", range(5))
def test_fast_front_and_incremental_curve_match_brute_force(seed):
    from nas.pareto import _hv_min, hypervolume_curve

    rng = np.random.default_rng(seed)
    v = rng.integers(0, 6, size=(60, 3)).astype(float)  # many ties and duplicates
    v[rng.integers(0, 60, 3), 1] = np.nan
    assert pareto_mask(v, ["minimize"] * 3).tolist() == _brute_mask(v).tolist()
    ranks = non_dominated_ranks(v, ["minimize"] * 3)
    rest = ranks > 0
    assert (ranks[rest] > 0).all() and pareto_mask(np.where(ranks[:, None] == 0, np.nan, v), ["minimize"] * 3).tolist() == (ranks == 1).tolist()
    ref = [6.0, 6.0, 6.0]
    curve = hypervolume_curve(v, ["minimize"] * 3, ref)
    assert curve == pytest.approx([hypervolume(v[: i + 1], ["minimize"] * 3, ref) for i in range(len(v))])
    front = v[pareto_mask(v, ["minimize"] * 3)]
    assert hypervolume(v, ["minimize"] * 3, ref) == pytest.approx(_hv_min(np.unique(front, axis=0), np.array(ref)))
