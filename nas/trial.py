"""Backend-neutral trial bookkeeping: what both the Optuna and the Ray backends do with a trial.

- :func:`record_rung_and_judge`: store a trial's accuracy at an early-stopping rung (and its
  pre-flight costs) in the study storage, then apply the Pareto rung rule against every other
  trial recorded at that rung, read back from the same storage, where the rung's calibration on
  the earliest finished trials says it predicts final accuracy (recorded as ``rung_E_rule``). Because the comparison data
  lives in the storage, it is shared by parallel workers, by both backends and across resumes.
- :func:`outcome`: how a pipeline exception maps to a trial state and a recorded reason.
- :func:`counts_toward_total`: whether a trial counts towards ``--trials`` (the backends' stop
  rule and the progress display agree on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna

from nas.early_stop import EarlyStopped, RungRule
from nas.errors import TrialFailure
from nas.objectives import COSTS

__all__ = ["rung_names", "record_rung_and_judge", "rung_decided_off", "outcome", "counts_toward_total"]


def counts_toward_total(trial: Any) -> bool:
    """Completed and pruned trials count, and failed ones with a recorded reason; not a trial
    whose worker died (``killed``) or was interrupted by Ctrl-C (``interrupted``), nor one
    failed without a reason (its process stopped before recording one): those are retried.
    Finalists and siblings never count: they retrain trials after the search, or compress the
    weights a trial trained (nas.siblings)."""
    state = getattr(trial.state, "name", str(trial.state))
    if trial.user_attrs.get("finalist_of") is not None:  # retrains a trial after the search (nas.finalists)
        return False
    if trial.user_attrs.get("sibling_of") is not None:
        return False
    if state in ("COMPLETE", "PRUNED"):
        return True
    if state != "FAIL":
        return False
    ua = trial.user_attrs
    return "fail_reason" in ua and not ua.get("killed") and not ua.get("interrupted")


def rung_names(objectives: Sequence[str]) -> list[str]:
    """What a rung compares: accuracy at the rung, then the study's cost objectives."""
    return ["accuracy"] + [o for o in objectives if o in COSTS]


def record_rung_and_judge(study: optuna.Study, trial_id: int, number: int, rule: RungRule, names: Sequence[str],
                          epoch: int, acc: float, costs: Mapping[str, Any]) -> str | None:
    """Record (accuracy at ``epoch``, costs) on trial ``trial_id`` and return the rung rule's
    stop reason against the other trials recorded at that rung (``None``: go on)."""
    key = f"rung_{epoch}"
    storage = study._storage  # user attributes are written through the storage, as Trial.set_user_attr does
    storage.set_trial_user_attr(trial_id, "costs", {n: float(costs[n]) for n in COSTS if n in costs})
    storage.set_trial_user_attr(trial_id, key, float(acc))
    trials = study.get_trials(deepcopy=False)
    finished = sorted((t.number, t.user_attrs[key], t.user_attrs["val_accuracy"]) for t in trials
                      if t.state == optuna.trial.TrialState.COMPLETE and key in t.user_attrs
                      and isinstance(t.user_attrs.get("val_accuracy"), (int, float)))
    use, why = rule.calibration([(r, f) for _, r, f in finished])
    storage.set_trial_user_attr(trial_id, f"{key}_rule", why)
    if not use:
        return None
    peers = [
        [t.user_attrs[key]] + [t.user_attrs["costs"][n] for n in names[1:]]
        for t in trials
        if t.number != number and key in t.user_attrs and "costs" in t.user_attrs
    ]
    point = [float(acc)] + [float(costs[n]) for n in names[1:]]
    return rule.verdict(epoch, point, np.array(peers, dtype=float), list(names))


def rung_decided_off(study: optuna.Study, rule: RungRule, epoch: int) -> str | None:
    """Why rung ``epoch`` will stop no trial of this study from now on (its calibration over the
    first finished trials said it does not predict final accuracy), or ``None`` while it may:
    then a trial can leave out the work that only serves that rung (the data-fraction screen)."""
    if rule.calibrate <= 0:
        return None
    key = f"rung_{epoch}"
    finished = sorted((t.number, t.user_attrs[key], t.user_attrs["val_accuracy"]) for t in study.get_trials(deepcopy=False)
                      if t.state == optuna.trial.TrialState.COMPLETE and key in t.user_attrs
                      and isinstance(t.user_attrs.get("val_accuracy"), (int, float)))
    if len(finished) < rule.calibrate:
        return None
    use, why = rule.calibration([(r, f) for _, r, f in finished])
    return None if use else why


def outcome(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """Trial state (``PRUNED`` or ``FAIL``) and user attributes for a pipeline exception.

    Early-stopped and constraint-rejected trials are PRUNED (they carry information: a rung
    accuracy, or costs over a limit); every other failure is FAIL with its reason."""
    from nas.pipeline import ConstraintViolation

    if isinstance(exc, EarlyStopped):
        return "PRUNED", {"fail_reason": str(exc), "rung_reached": exc.rung}
    if isinstance(exc, ConstraintViolation):
        costs = {n: float(v) for n, v in exc.costs.items() if n in COSTS and isinstance(v, (int, float))}
        return "PRUNED", {"fail_reason": str(exc), **({"costs": costs} if costs else {})}
    if isinstance(exc, TrialFailure):
        return "FAIL", {"fail_reason": str(exc)}
    return "FAIL", {"fail_reason": f"{type(exc).__name__}: {exc}"}
