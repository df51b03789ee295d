"""Finalists (``--finalists K``): the knee members of the front retrained with the long recipe,
recorded as ordinary trials that supersede their originals and do not count towards --trials."""

from __future__ import annotations

import json

import optuna
import pytest

from nas.backends.optuna import create_study, make_sampler, run_optuna
from nas.cli import main
from nas.finalists import (
    FINALIST_EPOCHS,
    FINALIST_OF,
    auto_finalists,
    choose_finalists,
    finalist_cost_s,
    finalist_epochs,
    run_finalists,
)
from nas.pipeline import Task
from nas.space import parse_space
from nas.study import front_frame, open_storage
from nas.trial import counts_toward_total

TINY = {"name": "tiny", "stem_channels": [8], "stages": [{"block": ["conv", "dsconv"], "width": [8, 16], "stride": 2}],
        "recipe": {"epochs": 1}}


def _study(tmp_path, values):
    space = parse_space(TINY)
    task = Task(dataset="digits", artifacts_dir=str(tmp_path / "art"), latency_floor_ms=0.001)
    storage = open_storage(f"sqlite:///{tmp_path}/t.db", create=True)
    study = create_study("t", storage, task, space, make_sampler("random", 0))
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    return study, space, task, storage


def test_the_knee_members_are_chosen_nearest_first_and_a_finalist_fills_its_slot(tmp_path):
    # accuracy, latency_ms, size_bytes: trial 1 is nearest the ideal point, then 2; 3 is dominated
    study, *_ = _study(tmp_path, [(0.99, 1.0, 1000.0), (0.95, 0.2, 100.0), (0.80, 0.1, 50.0), (0.70, 0.5, 500.0)])
    assert [t.number for t in choose_finalists(study, 2)] == [1, 2]
    assert [t.number for t in choose_finalists(study, 1)] == [1]
    assert choose_finalists(study, 0) == []
    # trial 1 retrained (better, here): the finalist dominates it and holds its slot near the knee
    study.add_trial(optuna.trial.create_trial(values=[0.97, 0.2, 100.0], user_attrs={FINALIST_OF: 1}))
    assert 1 not in set(front_frame(study)["trial"]) and 4 in set(front_frame(study)["trial"])
    assert [t.number for t in choose_finalists(study, 2)] == [2]
    assert [t.number for t in choose_finalists(study, 1)] == []  # its knee member is a finalist: nothing to do


def test_a_finalist_counts_not_towards_the_total_and_its_retry_stays_a_finalist(tmp_path):
    from nas.backends.recovery import fail_for_retry

    study, *_ = _study(tmp_path, [])
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    done = optuna.trial.create_trial(values=[0.9, 0.1, 10.0], params={"x": 1}, distributions=dist,
                                     user_attrs={FINALIST_OF: 0})
    assert not counts_toward_total(done)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={"x": 1},
                                              distributions=dist, user_attrs={FINALIST_OF: 0, FINALIST_EPOCHS: 9}))
    assert fail_for_retry(study, study.get_trials()[0], "worker died", flag="killed")
    retry = study.get_trials()[1]
    assert retry.state.name == "WAITING" and retry.user_attrs == {FINALIST_OF: 0, FINALIST_EPOCHS: 9}


def test_the_cost_estimate_and_the_defaults():
    t = optuna.trial.create_trial(values=[0.9, 0.1, 10.0],
                                  user_attrs={"epochs": 6, "train_s": 60.0, "screen_s": 5.0, "total_s": 75.0})
    assert finalist_cost_s(t, 36) == pytest.approx(60.0 / 6 * 36 + 10.0)  # per-epoch training x 36 + the rest
    assert finalist_epochs([6, 12]) == 36 and finalist_epochs([6, 12], override=2) == 6
    assert auto_finalists(51_000) == 0 and auto_finalists(1_500) == 0  # off by default: measured not to pay


def test_timeout_keeps_the_reserved_time(tmp_path):
    """With the whole timeout reserved for what follows, only the run's first trial starts."""
    _, space, task, storage = _study(tmp_path, [])
    seen = []

    def reserve(st):
        seen.append(len(st.get_trials()))
        return 1e9

    study = run_optuna(space, task, study_name="t", storage=storage, sampler="random", n_trials=3, timeout=600,
                       reserve_s=reserve)
    assert len(study.get_trials()) == 1 and seen  # consulted, and it stopped the search
    study = run_optuna(space, task, study_name="t", storage=storage, sampler="random", n_trials=3, timeout=600,
                       reserve_s=lambda st: 0.0)
    assert len(study.get_trials()) == 3


def test_search_retrains_finalists_with_the_long_recipe_and_rerunning_adds_nothing(in_tmp, capsys):
    db = f"sqlite:///{in_tmp}/f.db"
    argv = ["search", "--trials", "3", "--epochs", "1", "--finalists", "1", "--study", "f", "--storage", db,
            "--log-format", "json"]
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    study = optuna.load_study(study_name="f", storage=db)
    trials = study.get_trials()
    finalists = [t for t in trials if t.user_attrs.get(FINALIST_OF) is not None]
    assert len(trials) == 4 and len(finalists) == 1
    final = finalists[0]
    original = trials[final.user_attrs[FINALIST_OF]]
    assert final.state.name == "COMPLETE" and final.params == original.params
    assert final.user_attrs["epochs"] == 3 == final.user_attrs["candidate"]["recipe"]["epochs"]  # 3 x --epochs 1
    assert original.user_attrs["epochs"] == 1
    chosen = [e for e in events if e.get("event") == "finalist"]
    assert [(e["trial"], e["epochs"]) for e in chosen] == [(original.number, 3)] and chosen[0]["estimate_s"] > 0
    assert main(argv) == 0  # the same command again: no search trial (3 counted), no member retrained twice
    trials = optuna.load_study(study_name="f", storage=db).get_trials()
    of = [t.user_attrs[FINALIST_OF] for t in trials if t.user_attrs.get(FINALIST_OF) is not None]
    assert sum(counts_toward_total(t) for t in trials) == 3 and len(of) == len(set(of))


@pytest.mark.parametrize("flag,value", [("--finalists", "-1"), ("--finalists", "x"), ("--finalist-epochs", "0")])
def test_bad_finalist_flags_are_one_line_and_exit_2(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["search", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1] and value in err[-1]


def test_with_a_deadline_a_member_that_does_not_fit_is_skipped(tmp_path):
    import time

    study, *_ = _study(tmp_path, [])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 0.1, 10.0],
                                              user_attrs={"epochs": 2, "train_s": 100.0, "total_s": 110.0}))
    ran, skipped = [], []
    out = run_finalists(study, lambda trial: ran.append(trial.number) or (0.9, 0.1, 10.0), 1, 6,
                        deadline=time.monotonic() + 200, on_skipped=lambda t, cost, left: skipped.append((t.number, cost)))
    assert out == [] and ran == [] and skipped == [(0, 310.0)]  # 100 s / 2 epochs x 6 + 10 s > 200 s left
    out = run_finalists(study, lambda trial: (0.9, 0.1, 10.0), 1, 6, deadline=time.monotonic() + 400)
    assert out == [0] and study.get_trials()[-1].user_attrs[FINALIST_OF] == 0


def test_members_that_differ_only_in_epochs_are_one_finalist(tmp_path):
    study, *_ = _study(tmp_path, [])
    cand = {"arch": {"w": 8}, "recipe": {"epochs": 12, "lr": 0.01}}
    for epochs, values in ((12, [0.915, 0.020, 8834.0]), (6, [0.910, 0.019, 8884.0])):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={
            "candidate": {**cand, "recipe": {"epochs": epochs, "lr": 0.01}}}))
    assert len(front_frame(study)) == 2
    assert len(choose_finalists(study, 2)) == 1  # the other is the same model for 36 epochs
