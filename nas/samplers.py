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
import os
import threading
import time
import warnings
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

__all__ = ["SurrogateSampler", "RecordingTrial", "PLAN_ATTR", "PLAN_SECONDS_ATTR"]

PLAN_ATTR = "nas:plan"  # a trial's planned parameters, stored before its objective runs
PLAN_SECONDS_ATTR = "nas:plan_s"  # seconds the sampler took to plan the trial (reading the study included)


class RecordingTrial:
    """Answers a space's ``suggest_*`` calls from ``plan`` where it holds a valid value, else by
    a random draw; records every parameter asked and its distribution."""

    def __init__(self, plan: dict[str, Any], rng: np.random.Generator) -> None:
        self.plan, self.rng = plan, rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def _take(self, name: str, dist: BaseDistribution, draw: Callable[[], Any]) -> Any:
        v = self.plan.get(name, _MISSING)  # (None is a value a categorical may take)
        if v is _MISSING or not valid_value(dist, v):
            v = draw()
        self.params[name], self.distributions[name] = v, dist
        return v

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        choices = list(choices)
        return self._take(name, CategoricalDistribution(choices), lambda: choices[int(self.rng.integers(len(choices)))])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        def draw() -> int:
            if log:  # as Optuna's RandomSampler: uniform in log space over [low - 0.5, high + 0.5], rounded
                v = round(math.exp(self.rng.uniform(math.log(low - 0.5), math.log(high + 0.5))))
                return int(min(high, max(low, v)))
            return int(low + step * self.rng.integers((high - low) // step + 1))

        return self._take(name, IntDistribution(low, high, log=log, step=step), draw)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        def draw() -> float:
            if log:
                return float(math.exp(self.rng.uniform(math.log(low), math.log(high))))
            if step:  # the grid's last point is at or below high (floor, not round)
                return float(min(high, low + step * self.rng.integers(math.floor((high - low) / step + 1e-9) + 1)))
            return float(self.rng.uniform(low, high))

        return self._take(name, FloatDistribution(low, high, log=log, step=step), draw)


def valid_value(dist: BaseDistribution, v: Any) -> bool:
    """Whether ``dist`` holds ``v`` (a value of the type it takes, within its range and choices)."""
    try:
        return dist._contains(dist.to_internal_repr(v))
    except (ValueError, TypeError):
        return False


_MISSING = object()


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


class SurrogateSampler(optuna.samplers.BaseSampler):
    """See the module docstring. ``propose(trial_like)`` asks a space's genes through the given
    object (``lambda t: space.suggest(t, ...)``); without it, candidates range over the
    parameters finished trials asked (any Optuna objective). ``directions``: one per objective
    (default: the study's); ``objectives``: their names, so that pruned trials' rung accuracy and
    costs are read from their user attributes; ``seed=None``: a random seed. ``batch``: plans
    made per surrogate fit (the next ``batch - 1`` trials take the queued ones), for trials that
    cost about as much as a fit (a supernet's inherited-weight trials); the batch is chosen
    greedily, each pick added to the front at its optimistic value (mean minus one deviation)
    before the next is scored ("kriging believer"), so it spreads along the front instead of
    repeating one neighbourhood."""

    def __init__(self, propose: Callable[[Any], Any] | None = None, directions: Sequence[str] | None = None, *,
                 seed: int | None = 0, n_startup: int = 10, n_candidates: int = 256,
                 objectives: Sequence[str] | None = None, onehot: bool = False, model: str = "trees",
                 acquisition: str = "optimistic", batch: int = 1) -> None:
        if int(batch) < 1:
            raise ValueError(f"batch must be at least 1, got {batch!r}")
        self._batch = int(batch)
        self._queue: list[dict[str, Any]] = []  # plans of the last batch not yet taken
        if model not in ("trees", "gp"):
            raise ValueError(f"model must be 'trees' or 'gp', got {model!r}")
        if acquisition not in ("optimistic", "ehvi"):
            raise ValueError(f"acquisition must be 'optimistic' or 'ehvi', got {acquisition!r}")
        # optimistic: the hypervolume gain of each candidate's mean minus one standard deviation;
        # ehvi: its expected gain over draws from the surrogate's predictive distribution
        self._acquisition = acquisition
        self._propose = propose
        self._directions = list(directions or [])
        self._objectives = list(objectives or [])
        self._seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        self._n_startup = n_startup
        self._n_candidates = n_candidates
        self._onehot = onehot  # categoricals of 3+ choices as one column per choice (else their index)
        self._model = model  # the surrogate: an extra-trees ensemble, or a Gaussian process (one-hot inputs)
        self._random = optuna.samplers.RandomSampler(seed=self._seed)
        self._plans: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._plan_lock = threading.Lock()
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles the search algorithm and its sampler
        state = self.__dict__.copy()
        state["_lock"], state["_plan_lock"], state["_plans"], state["_queue"] = None, None, {}, []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._plan_lock = threading.Lock(), threading.Lock()
        self.__dict__.setdefault("_warned", set())
        self.__dict__.setdefault("_model", "trees")  # a sampler pickled before the GP option
        self.__dict__.setdefault("_acquisition", "optimistic")
        self.__dict__.setdefault("_batch", 1)

    # -- Optuna's sampler interface: everything is decided in before_trial
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def reseed_rng(self) -> None:
        """A new seed for the plans and the fallback random sampler (Optuna calls this for each
        worker of ``optimize(n_jobs=...)``, and its generic sampler tests check it)."""
        self._seed = int.from_bytes(os.urandom(4), "little")
        self._random.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # One plan at a time in this process, and each plan stored with its trial at once: a trial
        # still being planned (here, or in another worker) is never proposed twice (with n_jobs=2
        # unstored plans gave 4-8 duplicates in 3 x 40 trials).
        with self._plan_lock:
            t0 = time.perf_counter()
            trials = study.get_trials(deepcopy=False)
            rng = np.random.default_rng([self._seed, trial.number])
            dirs = self._directions or ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize"
                                        for d in study.directions]
            plan = self._queued(trials)
            try:
                if plan is None:
                    plans = self._plan(trials, rng, dirs)
                    plan, self._queue = (plans[0], plans[1:]) if plans else ({}, [])
            except Exception as exc:  # noqa: BLE001 - the trial must not be left RUNNING: random, said once
                self._warn(f"surrogate planning failed ({type(exc).__name__}: {exc}); such trials are sampled at random")
                plan = {}
            with self._lock:
                self._plans[trial._trial_id] = plan
            study._storage.set_trial_system_attr(trial._trial_id, PLAN_SECONDS_ATTR, time.perf_counter() - t0)
            if plan:
                study._storage.set_trial_system_attr(trial._trial_id, "nas:surrogate", True)
                try:
                    study._storage.set_trial_system_attr(trial._trial_id, PLAN_ATTR, plan)
                except (TypeError, ValueError):  # a value the storage cannot hold as JSON
                    pass

    def _queued(self, trials: list[FrozenTrial]) -> dict[str, Any] | None:
        """The next plan of the current batch that no trial (here or in another worker) has taken."""
        if not self._queue:
            return None
        seen = {_key(t.params) for t in trials if t.params}
        seen |= {_key(t.system_attrs[PLAN_ATTR]) for t in trials if isinstance(t.system_attrs.get(PLAN_ATTR), dict)}
        while self._queue:
            plan = self._queue.pop(0)
            if _key(plan) not in seen:
                return plan
        return None

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        with self._lock:
            plan = self._plans.get(trial._trial_id, {})
        v = plan.get(param_name, _MISSING)
        if v is not _MISSING and valid_value(param_distribution, v):
            return v
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        with self._lock:
            self._plans.pop(trial._trial_id, None)

    # -- the screening
    def _targets(self, t: FrozenTrial, n: int | None = None) -> list[float | None]:
        """Per objective (``n`` of them), what trial ``t`` tells about it (None: nothing); a
        pruned trial tells only where ``objectives`` names what its user attributes hold."""
        n = len(self._directions) if n is None else n
        if t.state == TrialState.COMPLETE and t.values is not None:
            return list(t.values)
        if t.state != TrialState.PRUNED or len(self._objectives) != n:
            return [None] * n
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

    def _plan(self, trials: list[FrozenTrial], rng: np.random.Generator, dirs: list[str]) -> list[dict[str, Any]]:
        """The next trial's plan, then (with ``batch``) the plans queued behind it; none: random."""
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        complete = [t for t in done if t.state == TrialState.COMPLETE and t.values is not None]
        seen = {_key(t.params) for t in trials if t.params}
        # trials still running were planned by a worker that stored its plan: not proposed again
        seen |= {_key(t.system_attrs[PLAN_ATTR]) for t in trials
                 if t.state == TrialState.RUNNING and isinstance(t.system_attrs.get(PLAN_ATTR), dict)}
        startup = len(complete) < max(1, self._n_startup)
        front = [] if startup else _front(complete, dirs)
        propose = self._propose or _history_proposer(trials)
        want = 1 if startup else self._n_candidates  # at the start: random, but never a repeat
        cands: list[RecordingTrial] = []
        failures: list[Exception] = []
        for i in range(want * 3 + 20):
            if len(cands) >= want:
                break
            parent = front[int(rng.integers(len(front)))].params if i % 2 and front else {}
            if parent:  # mutate a front member: each gene redrawn with probability 1/n (at least one)
                names = list(parent)
                drop = {n for n in names if rng.random() < 1.0 / len(names)} or {names[int(rng.integers(len(names)))]}
                plan = {k: v for k, v in parent.items() if k not in drop}
            else:
                plan = {}
            rec = RecordingTrial(plan, rng)
            try:
                propose(rec)
            except Exception as exc:  # noqa: BLE001 - a candidate the space refuses is just not proposed
                failures.append(exc)
                continue
            k = _key(rec.params)
            if k in seen:
                continue
            seen.add(k)
            cands.append(rec)
        if not cands:
            if failures:  # every proposal failed: say why, once, rather than turn silently random
                self._warn(f"the space refused every candidate proposed ({len(failures)}; first: "
                           f"{type(failures[0]).__name__}: {failures[0]}); trials are sampled at random")
            return []
        if startup:
            return [dict(cands[0].params)]
        mu, sd, front_y = self._predict(done, cands, dirs)
        scores = self._acquire(front_y, mu, sd)
        picks = [int(np.argmax(scores))]
        if self._batch > 1 and mu.shape[1]:
            picks = _greedy_batch(front_y, mu - sd, picks[0], min(self._batch, len(cands)),
                                  np.random.default_rng(self._seed))
            rest = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in picks]
            picks += rest[: min(self._batch, len(cands)) - len(picks)]  # nothing left to gain: by acquisition
        return [dict(cands[i].params) for i in picks]

    def _acquire(self, front_y: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
        if not len(mu) or not mu.shape[1]:  # nothing predicted: every candidate alike
            return np.zeros(len(mu))
        if self._acquisition == "ehvi":
            return _expected_hv_improvement(front_y, mu, sd, np.random.default_rng(self._seed))
        return _hv_improvement(front_y, mu - sd, np.random.default_rng(self._seed))

    def _predict(self, done: list[FrozenTrial], cands: list[RecordingTrial],
                 dirs: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted mean and spread of each candidate's objectives (minimization form, costs
        in log), and the complete trials' objectives in the same form."""
        from sklearn.ensemble import ExtraTreesRegressor

        names = sorted({n for t in done for n in t.params} | {n for c in cands for n in c.params})
        if not names:  # an objective without parameters: nothing to tell candidates apart by
            return np.zeros((len(cands), 0)), np.zeros((len(cands), 0)), np.zeros((0, 0))
        dists: dict[str, BaseDistribution] = {}
        for t in done:
            dists.update(t.distributions)
        for c in cands:
            dists.update(c.distributions)
        gp = self._model == "gp"
        x_hist = _encode([t.params for t in done], names, dists, self._onehot or gp)
        x_cand = _encode([c.params for c in cands], names, dists, self._onehot or gp)
        sign = np.array([-1.0 if d == "maximize" else 1.0 for d in dirs])
        targets = np.array([[np.nan if v is None else v for v in self._targets(t, len(dirs))] for t in done], dtype=float)
        targets[~np.isfinite(targets)] = np.nan  # an objective of +-inf or NaN tells the models nothing
        log_scale = np.array([d == "minimize" and np.nanmin(targets[:, j], initial=np.inf) > 0
                              for j, d in enumerate(dirs)])
        # minimization form, costs in log (they span orders of magnitude)
        y = np.where(log_scale, np.log(np.where(targets > 0, targets, np.nan)), targets) * sign
        mu = np.zeros((len(cands), y.shape[1]))
        sd = np.zeros_like(mu)
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[:, j])
            if ok.sum() < 2:
                continue
            if gp:
                mu[:, j], sd[:, j] = _gp_predict(x_hist[ok], y[ok, j], x_cand, self._seed)
                continue
            model = ExtraTreesRegressor(n_estimators=48, min_samples_leaf=2, random_state=self._seed, n_jobs=1)
            model.fit(x_hist[ok], y[ok, j])
            per_tree = np.stack([e.predict(x_cand) for e in model.estimators_])
            mu[:, j], sd[:, j] = per_tree.mean(0), per_tree.std(0)
        complete = np.array([t.state == TrialState.COMPLETE for t in done])
        front_y = y[complete]
        front_y = front_y[~np.isnan(front_y).any(1)]
        return mu, sd, front_y


def _gp_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation of a Gaussian process (Matern 5/2 with one length
    scale per input column, plus noise) fit by marginal likelihood; inputs scaled to [0, 1] over
    history and candidates, the target standardised."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    both = np.vstack([x, x_new])
    lo, hi = both.min(0), both.max(0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    xs, xn = (x - lo) / scale, (x_new - lo) / scale
    m, s = float(y.mean()), float(y.std()) or 1.0
    kernel = (ConstantKernel(1.0, (1e-2, 1e2)) * Matern(np.ones(x.shape[1]), (1e-2, 1e2), nu=2.5)
              + WhiteKernel(1e-2, (1e-6, 1.0)))

    def fit_hyperparameters(obj: Callable, theta0: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
        # L-BFGS-B from one start, at most 50 iterations: on a NAS-Bench-201 history of 100 trials
        # the default (two starts, to convergence) took 6.4-8.8 s per proposal and chose the same
        # candidate as this in 1.7 s (each likelihood evaluation is ~10 ms at 100 trials x 30 inputs)
        from scipy.optimize import minimize

        r = minimize(obj, theta0, method="L-BFGS-B", jac=True, bounds=bounds, options={"maxiter": 50})
        return r.x, float(r.fun)

    model = GaussianProcessRegressor(kernel, normalize_y=False, optimizer=fit_hyperparameters,
                                     n_restarts_optimizer=0, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(xs, (y - m) / s)
        mu, sd = model.predict(xn, return_std=True)
    return mu * s + m, sd * s


def _history_proposer(trials: list[FrozenTrial]) -> Callable[[Any], None]:
    """Without a space's ``suggest`` (a plain Optuna objective): candidates over every parameter
    the finished trials asked for, with its latest distribution (a parameter only some trials
    ask is proposed anyway: the objective ignores what it does not ask)."""
    dists: dict[str, BaseDistribution] = {}
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            dists.update(t.distributions)

    def propose(rec: RecordingTrial) -> None:
        for name in sorted(dists):
            d = dists[name]
            if isinstance(d, CategoricalDistribution):
                rec.suggest_categorical(name, d.choices)
            elif isinstance(d, IntDistribution):
                rec.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
            elif isinstance(d, FloatDistribution):
                rec.suggest_float(name, d.low, d.high, step=d.step, log=d.log)

    return propose


def _front(trials: list[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    from nas.pareto import pareto_mask

    vals = np.array([t.values for t in trials], dtype=float)
    return [t for t, keep in zip(trials, pareto_mask(vals, directions)) if keep]


def _encode(params: list[dict[str, Any]], names: list[str], dists: dict[str, BaseDistribution],
            onehot: bool = False) -> np.ndarray:
    """One column per gene: a categorical as its choice index (or, ``onehot``, one 0/1 column
    per choice where it has 3 or more), a number as its value (log where the distribution is),
    -1 where the gene was not asked (it did not matter)."""
    cols: list[np.ndarray] = []
    for n in names:
        d = dists.get(n)
        if onehot and isinstance(d, CategoricalDistribution) and len(d.choices) > 2:
            block = np.full((len(params), len(d.choices)), -1.0)
            for i, p in enumerate(params):
                if n in p and p[n] in d.choices:
                    block[i] = 0.0
                    block[i, d.choices.index(p[n])] = 1.0
            cols.append(block)
            continue
        col = np.full((len(params), 1), -1.0)
        for i, p in enumerate(params):
            if n not in p or d is None:
                continue
            v = p[n]
            if isinstance(d, CategoricalDistribution):
                col[i, 0] = d.choices.index(v) if v in d.choices else -1.0
            elif getattr(d, "log", False) and v > 0:
                col[i, 0] = math.log(v)
            else:
                col[i, 0] = float(v)
        cols.append(col)
    return np.hstack(cols) if cols else np.zeros((len(params), 0))


def _free_points(front: np.ndarray, allp: np.ndarray, rng: np.random.Generator,
                 samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points of the box from ``allp``'s lowest values to the worst of ``front`` plus a 10%
    margin (without a front: ``allp``'s worst) that no front member dominates; and the box's span."""
    lo = allp.min(0)
    hi = front.max(0) if len(front) else allp.max(0)  # the reference point: the worst of the current front
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    ref = hi + 0.1 * span
    pts = lo + rng.random((samples, allp.shape[1])) * (ref - lo)
    dominated = np.zeros(samples, dtype=bool)
    for p in front:
        dominated |= (pts >= p).all(1)
    return pts[~dominated], span


def _hv_improvement(front: np.ndarray, cands: np.ndarray, rng: np.random.Generator, samples: int = 20000) -> np.ndarray:
    """Monte Carlo estimate of each candidate's hypervolume improvement over ``front`` (all in
    minimization form), in a box normalized to the observed ranges with a 10% margin."""
    allp = np.vstack([front, cands]) if len(front) else cands
    free, span = _free_points(front, allp, rng, samples)
    if not len(free):
        return np.zeros(len(cands))
    gain = np.array([((free >= c).all(1)).sum() for c in cands], dtype=float)
    if gain.max() <= 0:  # nobody is predicted to enter the front: the one predicted closest to it
        d = np.array([np.min(np.max((c - front) / span, axis=1)) if len(front) else 0.0 for c in cands])
        return -d
    return gain


def _greedy_batch(front: np.ndarray, pts: np.ndarray, first: int, k: int, rng: np.random.Generator,
                  samples: int = 20000) -> list[int]:
    """Up to ``k`` picks of ``pts`` (minimization form), ``first`` first, each the one that adds
    the most hypervolume to ``front`` and the picks before it ("kriging believer" on the
    optimistic points, in one fixed box: :func:`_hv_improvement`'s); stops early when no
    remaining point adds any."""
    allp = np.vstack([front, pts]) if len(front) else pts
    free = _free_points(front, allp, rng, samples)[0]
    alive = np.ones(len(free), dtype=bool)
    picks = [first]
    while len(picks) < k and len(free):
        alive &= ~(free >= pts[picks[-1]]).all(1)
        gain = np.array([((free[alive] >= p).all(1)).sum() for p in pts], dtype=float)
        gain[picks] = -1.0
        if gain.max() <= 0:
            break
        picks.append(int(np.argmax(gain)))
    return picks


def _expected_hv_improvement(front: np.ndarray, mu: np.ndarray, sd: np.ndarray, rng: np.random.Generator,
                             draws: int = 24, samples: int = 20000, keep: int = 1500) -> np.ndarray:
    """Monte Carlo expected hypervolume improvement of each candidate over ``front`` (minimization
    form): the mean, over ``draws`` draws of its objectives from N(mu, sd) (independent per
    objective), of the share of the box's non-dominated points the draw dominates. The box is
    :func:`_hv_improvement`'s; at most ``keep`` of its free points are used."""
    if not len(front):
        return _hv_improvement(front, mu - sd, rng, samples)
    free = _free_points(front, np.vstack([front, mu - 2 * sd]), rng, samples)[0][:keep]
    if not len(free):
        return np.zeros(len(mu))
    z = rng.standard_normal((draws, mu.shape[1]))  # common random numbers: candidates compared on the same draws
    gain = np.zeros(len(mu))
    for i in range(0, len(mu), 32):  # 32 candidates at a time: (32, draws, free, objectives) booleans
        y = mu[i:i + 32, None] + sd[i:i + 32, None] * z[None]
        gain[i:i + 32] = (free[None, None] >= y[:, :, None]).all(3).mean((1, 2))
    if gain.max() <= 0:
        return _hv_improvement(front, mu - sd, rng, samples)
    return gain
