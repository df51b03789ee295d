"""Multi-fidelity early stopping for several objectives (Optuna's pruners only handle one).

Successive halving on Pareto dominance: training is checked at rungs (by default after 1/4
and 1/2 of the epochs). At a rung, a trial is compared with every trial that already reached
the same rung on (validation accuracy at that rung, and its costs, which are known exactly
from the pre-flight). Every point of the rung is scored by how many others dominate it (0 on
the rung's Pareto front); the trial is promoted if it is on that front or if fewer than
``ceil(n / eta)`` points score strictly better, i.e. if it ranks in the best ``1/eta`` of the
rung in the Pareto sense. Nothing is stopped until ``min_peers`` trials have reached the rung. Stopped trials are
recorded as PRUNED with the rung they reached.

A rung is used only where it predicts: the first ``calibrate`` trials that reach the end run in
full, then the rank correlation (Spearman) between their accuracy at the rung and their final
validation accuracy decides whether that rung may stop anything (its 80% lower confidence
bound ``>= min_rho``, so a high estimate from a few trials is not enough). Measured on
the bundled tasks (`experiments/rung_correlation.py`): 8x8 digits 0.75 / 0.86 at 1/4 / 1/2 of
the epochs, but 16x16 digits with shifts and noise 0.16 / 0.38 and MNIST-1D 0.10 / 0.19, where
a fixed rule discarded the candidates that end best. A user's data decides for itself.

The rule is backend-neutral: a backend supplies ``peers(rung)`` (the records of other trials
at that rung, from the study storage) and ``record(rung, accuracy)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nas.errors import TrialFailure
from nas.objectives import OBJECTIVES

__all__ = ["EarlyStopped", "RungRule", "dominated_by", "spearman_lower_bound"]


class EarlyStopped(TrialFailure):
    """Stopped at a rung by multi-objective successive halving."""

    def __init__(self, message: str, rung: int) -> None:
        super().__init__(message)
        self.rung = rung


def dominated_by(point: Sequence[float], peers: np.ndarray, directions: Sequence[str]) -> int:
    """How many rows of ``peers`` Pareto-dominate ``point``."""
    if len(peers) == 0:
        return 0
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    p = np.asarray(point, dtype=float) * sign
    q = np.asarray(peers, dtype=float) * sign
    return int(np.sum(np.all(q <= p, axis=1) & np.any(q < p, axis=1)))


def spearman_lower_bound(rho: float, n: int, z: float = 0.8416) -> float:
    """One-sided lower confidence bound (80% by default) of a Spearman correlation from ``n``
    pairs: Fisher's z-transform with the variance 1.06 / (n - 3) of Fieller, Hartley and Pearson
    (1957). With 12 trials the estimate itself is too noisy to act on: on 16x16 digits a rung
    whose correlation measured 0.16 over 16 trials came out 0.55 and 0.61 over the first 12 of
    two searches, was kept, and stopped the candidates that end best."""
    r = min(max(rho, -0.9999), 0.9999)
    return float(math.tanh(math.atanh(r) - z * math.sqrt(1.06 / max(n - 3, 1))))


@dataclass(frozen=True)
class RungRule:
    """Rung fractions of the epoch budget, reduction factor and minimum peers per rung."""

    fractions: tuple[float, ...] = (0.25, 0.5)
    eta: float = 3.0
    min_peers: int = 4
    calibrate: int = 12  # finished trials whose rung-vs-final correlation decides; 0 trusts every rung
    min_rho: float = 0.5  # for the one-sided 80% lower confidence bound of that correlation

    def calibration(self, pairs: Sequence[tuple[float, float]]) -> tuple[bool, str]:
        """Whether a rung may stop trials, from (accuracy at the rung, final validation
        accuracy) of the earliest finished trials, and why (recorded on the trial)."""
        if self.calibrate <= 0:
            return True, "on"
        if len(pairs) < self.calibrate:
            return False, f"calibrating ({len(pairs)} of {self.calibrate} finished trials)"
        from scipy.stats import spearmanr

        rung, final = np.asarray(pairs[: self.calibrate], dtype=float).T
        rho = float(spearmanr(rung, final).statistic) if np.ptp(rung) > 0 and np.ptp(final) > 0 else 0.0
        rho = 0.0 if math.isnan(rho) else rho
        low = spearman_lower_bound(rho, self.calibrate)
        verdict = "on" if low >= self.min_rho else "off"
        return verdict == "on", (f"{verdict}: Spearman {rho:.2f} between rung and final accuracy over the first "
                                 f"{self.calibrate} finished trials, lower 80% bound {low:.2f} (needs {self.min_rho:g})")

    def rungs(self, epochs: int) -> list[int]:
        rungs = {max(1, int(round(f * epochs))) for f in self.fractions}
        return sorted(r for r in rungs if r < epochs)

    def verdict(self, rung: int, point: Sequence[float], peers: np.ndarray, names: Sequence[str]) -> str | None:
        """A stop reason, or ``None`` to promote. ``point`` and rows of ``peers`` hold values
        for ``names`` (accuracy at the rung first, then the costs)."""
        if len(peers) < self.min_peers:
            return None
        dirs = [OBJECTIVES[n] for n in names]
        k = dominated_by(point, peers, dirs)
        if k == 0:
            return None
        everyone = np.vstack([peers, np.asarray(point, dtype=float)[None, :]])
        scores = [dominated_by(p, everyone, dirs) for p in peers]
        better = sum(s < k for s in scores)
        keep = math.ceil(len(everyone) / self.eta)
        if better >= keep:
            where = "the data-fraction screen (rung 0)" if rung == 0 else f"epoch {rung}"
            return (f"early-stopped at {where}: dominated by {k} of {len(peers)} trials at this rung on "
                    f"({', '.join(names)}); {better} rank better, only the best {keep} (1/eta={1 / self.eta:.2g}) go on")
        return None

