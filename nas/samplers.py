"""A surrogate-screening sampler: many candidates are scored per trial, one is trained.

Each trial costs seconds to minutes of training, while proposing a candidate costs
microseconds. So before every trial this sampler draws a few hundred candidates (half at
random from the space, half as mutations of the current Pareto-optimal trials), predicts each
one's objectives with tree-ensemble surrogates fit on the trials already in the study, and
trains only the candidate with the largest expected hypervolume improvement over the current
front (optimistic by one ensemble standard deviation, so unexplored regions keep a chance).

What it learns from, read back from the study storage every time (so parallel workers, Ray
and resumed runs share it, and nothing lives only in memory):

- completed trials: every objective;
- trials stopped early at a rung: their last rung accuracy (a lower bound, they stopped
  because others were better), and their measured costs;
- trials rejected by a hard limit before training: their measured costs (latency, size,
  FLOPs and params are known before training, and the surrogate learns where the limits bite).

Optuna's own multi-objective samplers see only COMPLETE trials (NSGA-II and TPE ignore
PRUNED ones), and none of them can screen candidates by a model of cost, which is why this is
written here. The surrogates are scikit-learn's ExtraTreesRegressor; the hypervolume
improvement is estimated by Monte Carlo over the normalized objective box, which is fast
enough to score every candidate in tens of milliseconds.

Candidates are proposed through the space's own ``suggest`` (a recording trial object that
answers ``suggest_*`` calls), so only the genes that matter are ever drawn, and a candidate
whose genes equal an existing trial's is never proposed twice.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SurrogateSampler", "RecordingTrial"]


class RecordingTrial:
    """Answers a space's ``suggest_*`` calls from ``plan`` where it holds a valid value, else by
    a random draw; records every parameter asked and its distribution."""

    def __init__(self, plan: dict[str, Any], rng: np.random.Generator) -> None:
        self.plan, self.rng = plan, rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def _take(self, name: str, dist: BaseDistribution, draw: Callable[[], Any]) -> Any:
        v = self.plan.get(name)
        if v is None or not _valid(dist, v):
            v = draw()
        self.params[name], self.distributions[name] = v, dist
        return v

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        choices = list(choices)
        return self._take(name, CategoricalDistribution(choices), lambda: choices[int(self.rng.integers(len(choices)))])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        def draw() -> int:
            if log:
                return int(min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high + 1)) - 0.5)))))
            return int(low + step * self.rng.integers((high - low) // step + 1))

        return self._take(name, IntDistribution(low, high, log=log, step=step), draw)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        def draw() -> float:
            if log:
                return float(math.exp(self.rng.uniform(math.log(low), math.log(high))))
            if step:
                return float(low + step * self.rng.integers(round((high - low) / step) + 1))
            return float(self.rng.uniform(low, high))

        return self._take(name, FloatDistribution(low, high, log=log, step=step), draw)


def _valid(dist: BaseDistribution, v: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(v))
    except (ValueError, TypeError):
        return False


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


class SurrogateSampler(optuna.samplers.BaseSampler):
    """See the module docstring. ``propose(trial_like)`` asks a space's genes through the given
    object (``lambda t: space.suggest(t, ...)``); ``directions``: one per objective."""

    def __init__(self, propose: Callable[[Any], Any], directions: Sequence[str], *, seed: int = 0,
                 n_startup: int = 10, n_candidates: int = 256, objectives: Sequence[str] | None = None) -> None:
        self._propose = propose
        self._directions = list(directions)
        self._objectives = list(objectives or [])
        self._seed = seed
        self._n_startup = n_startup
        self._n_candidates = n_candidates
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._plans: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles the search algorithm and its sampler
        state = self.__dict__.copy()
        state["_lock"], state["_plans"] = None, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- Optuna's sampler interface: everything is decided in before_trial
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        rng = np.random.default_rng([self._seed, trial.number])
        plan = self._plan(trials, rng)
        with self._lock:
            self._plans[trial._trial_id] = plan
        if plan:
            study._storage.set_trial_system_attr(trial._trial_id, "nas:surrogate", True)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        with self._lock:
            plan = self._plans.get(trial._trial_id, {})
        v = plan.get(param_name)
        if v is not None and _valid(param_distribution, v):
            return v
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        with self._lock:
            self._plans.pop(trial._trial_id, None)

    # -- the screening
    def _targets(self, t: FrozenTrial) -> list[float | None]:
        """Per objective, what trial ``t`` tells about it (None: nothing)."""
        if t.state == TrialState.COMPLETE and t.values is not None:
            return list(t.values)
        if t.state != TrialState.PRUNED:
            return [None] * len(self._directions)
        out: list[float | None] = []
        for name in self._objectives:
            if name == "accuracy":
                rungs = {int(k[5:]): v for k, v in t.user_attrs.items()
                         if k.startswith("rung_") and k[5:].isdigit() and isinstance(v, (int, float))}
                out.append(float(rungs[max(rungs)]) if rungs else None)
            else:
                v = t.user_attrs.get(name, (t.user_attrs.get("costs") or {}).get(name))
                out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
        return out

    def _plan(self, trials: list[FrozenTrial], rng: np.random.Generator) -> dict[str, Any]:
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        complete = [t for t in done if t.state == TrialState.COMPLETE and t.values is not None]
        seen = {_key(t.params) for t in trials if t.params}
        startup = len(complete) < self._n_startup or not self._objectives
        front = [] if startup else _front(complete, self._directions)
        want = 1 if startup else self._n_candidates  # at the start: random, but never a repeat
        cands: list[RecordingTrial] = []
        for i in range(want * 3 + 20):
            if len(cands) >= want:
                break
            if i % 2 and front:  # mutate a front member: each gene redrawn with probability 1/n (at least one)
                parent = front[int(rng.integers(len(front)))].params
                names = list(parent)
                drop = {n for n in names if rng.random() < 1.0 / len(names)} or {names[int(rng.integers(len(names)))]}
                plan = {k: v for k, v in parent.items() if k not in drop}
            else:
                plan = {}
            rec = RecordingTrial(plan, rng)
            try:
                self._propose(rec)
            except Exception:  # noqa: BLE001 - a candidate the space refuses is just not proposed
                continue
            k = _key(rec.params)
            if k in seen:
                continue
            seen.add(k)
            cands.append(rec)
        if not cands:
            return {}
        if startup:
            return dict(cands[0].params)
        scores = self._score(done, cands)
        return dict(cands[int(np.argmax(scores))].params)

    def _score(self, done: list[FrozenTrial], cands: list[RecordingTrial]) -> np.ndarray:
        from sklearn.ensemble import ExtraTreesRegressor

        names = sorted({n for t in done for n in t.params} | {n for c in cands for n in c.params})
        dists: dict[str, BaseDistribution] = {}
        for t in done:
            dists.update(t.distributions)
        for c in cands:
            dists.update(c.distributions)
        x_hist = _encode([t.params for t in done], names, dists)
        x_cand = _encode([c.params for c in cands], names, dists)
        sign = np.array([-1.0 if d == "maximize" else 1.0 for d in self._directions])
        targets = np.array([[np.nan if v is None else v for v in self._targets(t)] for t in done], dtype=float)
        log_scale = np.array([d == "minimize" and np.nanmin(targets[:, j], initial=np.inf) > 0
                              for j, d in enumerate(self._directions)])
        # minimization form, costs in log (they span orders of magnitude)
        y = np.where(log_scale, np.log(np.where(targets > 0, targets, np.nan)), targets) * sign
        mu = np.zeros((len(cands), y.shape[1]))
        sd = np.zeros_like(mu)
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[:, j])
            if ok.sum() < 2:
                continue
            model = ExtraTreesRegressor(n_estimators=48, min_samples_leaf=2, random_state=self._seed, n_jobs=1)
            model.fit(x_hist[ok], y[ok, j])
            per_tree = np.stack([e.predict(x_cand) for e in model.estimators_])
            mu[:, j], sd[:, j] = per_tree.mean(0), per_tree.std(0)
        complete = np.array([t.state == TrialState.COMPLETE for t in done])
        front_y = y[complete]
        front_y = front_y[~np.isnan(front_y).any(1)]
        return _hv_improvement(front_y, mu - sd, np.random.default_rng(self._seed))


def _front(trials: list[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    from nas.pareto import pareto_mask

    vals = np.array([t.values for t in trials], dtype=float)
    return [t for t, keep in zip(trials, pareto_mask(vals, directions)) if keep]


def _encode(params: list[dict[str, Any]], names: list[str], dists: dict[str, BaseDistribution]) -> np.ndarray:
    """One column per gene: a categorical as its choice index, a number as its value (log where
    the distribution is), -1 where the gene was not asked (it did not matter)."""
    x = np.full((len(params), len(names)), -1.0)
    for j, n in enumerate(names):
        d = dists.get(n)
        for i, p in enumerate(params):
            if n not in p or d is None:
                continue
            v = p[n]
            if isinstance(d, CategoricalDistribution):
                x[i, j] = d.choices.index(v) if v in d.choices else -1.0
            elif getattr(d, "log", False) and v > 0:
                x[i, j] = math.log(v)
            else:
                x[i, j] = float(v)
    return x


def _hv_improvement(front: np.ndarray, cands: np.ndarray, rng: np.random.Generator, samples: int = 20000) -> np.ndarray:
    """Monte Carlo estimate of each candidate's hypervolume improvement over ``front`` (all in
    minimization form), in a box normalized to the observed ranges with a 10% margin."""
    allp = np.vstack([front, cands]) if len(front) else cands
    lo, hi = allp.min(0), allp.max(0)
    if len(front):
        hi = front.max(0)  # the reference point: the worst of the current front, plus a margin
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    ref = hi + 0.1 * span
    pts = lo + rng.random((samples, allp.shape[1])) * (ref - lo)
    dominated = np.zeros(samples, dtype=bool)
    for p in front:
        dominated |= (pts >= p).all(1)
    free = pts[~dominated]
    if not len(free):
        return np.zeros(len(cands))
    gain = np.array([((free >= c).all(1)).sum() for c in cands], dtype=float)
    if gain.max() <= 0:  # nobody is predicted to enter the front: the one predicted closest to it
        d = np.array([np.min(np.max((c - front) / span, axis=1)) if len(front) else 0.0 for c in cands])
        return -d
    return gain
