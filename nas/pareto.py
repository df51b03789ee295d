"""Non-dominated sorting, Pareto fronts and hypervolume, on plain arrays.

All functions take a value matrix (n points x m objectives) and the objectives' directions;
internally everything is turned into minimization. Rows holding NaN/inf (failed or
unfinished trials) are never on a front and add no volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["to_minimize", "non_dominated_ranks", "pareto_mask", "hypervolume"]


def to_minimize(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return v * sign


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_ranks(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Rank 0 for the Pareto front, 1 for the front once rank 0 is removed, ...; -1 for invalid rows.

    Equal points share a rank (neither dominates the other).
    """
    v = to_minimize(values, directions)
    n = len(v)
    ranks = np.full(n, -1, dtype=int)
    valid = np.all(np.isfinite(v), axis=1)
    remaining = set(np.flatnonzero(valid).tolist())
    rank = 0
    while remaining:
        idx = sorted(remaining)
        front = [i for i in idx if not any(_dominates(v[j], v[i]) for j in idx if j != i)]
        for i in front:
            ranks[i] = rank
        remaining -= set(front)
        rank += 1
    return ranks


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    return non_dominated_ranks(values, directions) == 0


def _hv_min(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by ``points`` (minimization) and bounded by ``ref``, by slicing on the
    last objective (HSO). Exact; fine for the few hundred points and <= 4 objectives here."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    order = np.argsort(points[:, -1])
    pts = points[order]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        depth = upper - pts[i, -1]
        if depth <= 0:
            continue
        slice_pts = pts[: i + 1, :-1]
        keep = pareto_mask(slice_pts, ["minimize"] * slice_pts.shape[1])
        volume += depth * _hv_min(slice_pts[keep], ref[:-1])
    return volume


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume of ``values`` w.r.t. ``reference`` (given in the objectives' own directions).

    Points that do not strictly improve on the reference in every objective contribute
    nothing, as do rows with NaN/inf.
    """
    v = to_minimize(values, directions)
    ref = to_minimize(np.asarray([reference], dtype=float), directions)[0]
    ok = np.all(np.isfinite(v), axis=1) & np.all(v < ref, axis=1)
    v = v[ok]
    if len(v) == 0:
        return 0.0
    v = v[pareto_mask(v, ["minimize"] * v.shape[1])]
    return _hv_min(v, ref)
