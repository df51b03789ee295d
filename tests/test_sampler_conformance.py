"""The surrogate sampler as an Optuna sampler (issue 26): the cases of Optuna's generic sampler
tests that apply (reseeding, reproducibility, every distribution kind, multi-objective), and each
probe a user of Optuna tried: infinite objectives, no parameters, n_startup=0, n_jobs=2, a None
choice, the top of a log-int range, a float step's high bound, a proposer that always fails."""

from __future__ import annotations

import math
import warnings
from unittest.mock import patch

import numpy as np
import optuna
import pytest

from nas.samplers import RecordingTrial, SurrogateSampler

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _objective(trial: optuna.Trial) -> float:  # Optuna's generic objective: every kind of parameter
    a = trial.suggest_float("a", 1, 9)
    b = trial.suggest_float("b", 1, 9, log=True)
    c = trial.suggest_float("c", 1, 9, step=1)
    d = trial.suggest_int("d", 1, 9)
    e = trial.suggest_int("e", 1, 9, log=True)
    f = trial.suggest_int("f", 1, 9, step=2)
    g = trial.suggest_categorical("g", range(1, 10))
    return a + b + c + d + e + f + g


def _sampler(seed: int | None = 1, **kw) -> SurrogateSampler:
    return SurrogateSampler(seed=seed, n_startup=4, n_candidates=32, **kw)


def test_reseed_rng_reseeds_the_inner_sampler_and_changes_sampling():
    sampler = _sampler()
    with patch.object(sampler._random, "reseed_rng", wraps=sampler._random.reseed_rng) as inner:
        sampler.reseed_rng()
        assert inner.call_count == 1
    study = optuna.create_study(sampler=_sampler())
    study.optimize(_objective, n_trials=12)
    reseeded = _sampler()
    reseeded.reseed_rng()
    other = optuna.create_study(sampler=reseeded)
    other.optimize(_objective, n_trials=12)
    assert any(study.trials[i].params != other.trials[i].params for i in range(12))


def test_reproducible_for_one_seed_and_not_across_seeds():
    runs = []
    for seed in (1, 1, 2):
        study = optuna.create_study(sampler=_sampler(seed))
        study.optimize(_objective, n_trials=12)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_every_value_lies_in_its_distribution_and_the_surrogate_takes_over():
    study = optuna.create_study(sampler=_sampler())
    study.optimize(_objective, n_trials=15)
    for t in study.trials:
        for name, v in t.params.items():
            assert t.distributions[name]._contains(t.distributions[name].to_internal_repr(v)), (name, v)
    assert sum(bool(t.system_attrs.get("nas:surrogate")) for t in study.trials) >= 10  # after 4 random ones


def test_multi_objective_with_the_study_directions():
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=_sampler())
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=14)
    assert len(study.trials) == 14 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_an_infinite_objective_leaves_no_trial_running():
    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        return math.inf if x > 0.3 else x * x

    study = optuna.create_study(sampler=_sampler())
    study.optimize(objective, n_trials=16)  # raised "Input y contains infinity", a trial left RUNNING
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 16


def test_an_objective_without_parameters():
    study = optuna.create_study(sampler=_sampler())
    study.optimize(lambda t: 1.0, n_trials=8)  # raised "high <= 0" at the fourth trial
    assert len(study.trials) == 8


def test_n_startup_zero_uses_the_surrogate_from_the_second_trial():
    study = optuna.create_study(sampler=SurrogateSampler(seed=0, n_startup=0, n_candidates=16))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=5)  # IndexError on the first
    assert len(study.trials) == 5 and study.trials[1].system_attrs.get("nas:surrogate")


def test_two_jobs_never_propose_one_candidate_twice():
    def objective(trial):
        return sum(trial.suggest_categorical(n, [0, 1, 2, 3]) for n in "abc")  # 64 candidates

    for seed in (0, 1, 2):
        study = optuna.create_study(sampler=_sampler(seed))
        study.optimize(objective, n_trials=40, n_jobs=2)
        keys = [tuple(sorted(t.params.items())) for t in study.trials]
        assert len(keys) == 40 and len(set(keys)) == 40  # 4-8 duplicates before


def test_none_is_a_choice_the_plan_can_hold():
    rec = RecordingTrial({"c": None}, np.random.default_rng(0))
    assert all(rec.suggest_categorical("c", [None, 1, 2]) is None for _ in range(20))
    sampler = _sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    sampler._plans[trial._trial_id] = {"c": None}
    assert trial.suggest_categorical("c", [1, None]) is None


def test_log_int_reaches_both_ends_and_a_float_step_stays_under_high():
    rec = RecordingTrial({}, np.random.default_rng(0))
    ints = [rec.suggest_int(f"e{i}", 1, 100, log=True) for i in range(5000)]
    assert min(ints) == 1 and max(ints) == 100  # max was 61
    with warnings.catch_warnings():  # (Optuna's own note that 1.0 is not on the 0.3 grid)
        warnings.simplefilter("ignore")
        floats = {rec.suggest_float(f"c{i}", 0.0, 1.0, step=0.3) for i in range(2000)}
    assert max(floats) <= 1.0 and {round(v, 6) for v in floats} == {0.0, 0.3, 0.6, 0.9}  # rounding gave 1.2


def test_a_proposer_that_always_fails_is_said_not_swallowed():
    def broken(trial):
        raise RuntimeError("space is broken")

    study = optuna.create_study(sampler=SurrogateSampler(broken, seed=0, n_startup=2, n_candidates=8))
    with pytest.warns(UserWarning, match="refused every candidate proposed .* RuntimeError: space is broken"):
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    assert len(study.trials) == 4
    with warnings.catch_warnings():  # said once, not once per trial
        warnings.simplefilter("error")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)


def test_the_gp_surrogate_closes_in_on_a_smooth_optimum():
    # (the trees reach 0.02 here: piecewise-constant models are coarse on a smooth bowl)
    def objective(trial):
        return (trial.suggest_float("x", 0, 1) - 0.3) ** 2 + (trial.suggest_float("y", 0, 1) - 0.7) ** 2

    study = optuna.create_study(sampler=_sampler(0, model="gp"))
    study.optimize(objective, n_trials=24)
    assert all(t.system_attrs.get("nas:surrogate") for t in study.trials[4:])
    startup_best = min(t.value for t in study.trials[:4])
    assert study.best_value < min(0.01, startup_best / 4), (study.best_value, startup_best)


def test_an_unknown_surrogate_model_is_refused():
    with pytest.raises(ValueError, match="model must be 'trees' or 'gp', got 'svm'"):
        SurrogateSampler(model="svm")


def test_expected_hypervolume_improvement_counts_uncertainty():
    from nas.samplers import _expected_hv_improvement

    front = np.array([[0.0, 1.0], [1.0, 0.0]])  # minimization form
    mu = np.array([[0.9, 0.9],     # certain, and ahead of the front: gains
                   [2.0, 2.0],     # confidently beyond the front's worst: nothing
                   [1.05, 1.05]])  # just outside the region it would gain in, but uncertain
    sd = np.array([[0.0, 0.0], [0.0, 0.0], [0.3, 0.3]])
    gain = _expected_hv_improvement(front, mu, sd, np.random.default_rng(0))
    assert gain[0] > 0 and gain[1] == 0 and gain[2] > 0, gain
    # the same mean without uncertainty gains nothing (ranked by its distance to the front instead)
    assert _expected_hv_improvement(front, mu[2:], np.zeros((1, 2)), np.random.default_rng(0))[0] <= 0


def test_the_gp_surrogate_with_ehvi_on_two_objectives():
    def objective(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        return (x - 0.2) ** 2 + y, (x - 0.8) ** 2 + y  # the front: y = 0, x in [0.2, 0.8]

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(0, model="gp", acquisition="ehvi"))
    study.optimize(objective, n_trials=24)
    assert all(t.system_attrs.get("nas:surrogate") for t in study.trials[4:])
    late = [t.params["y"] for t in study.trials[12:]]
    assert np.median(late) < 0.1, late  # the surrogate's trials close in on the front


def test_an_unknown_acquisition_is_refused():
    with pytest.raises(ValueError, match="acquisition must be 'optimistic' or 'ehvi', got 'pi'"):
        SurrogateSampler(acquisition="pi")
