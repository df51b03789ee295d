from __future__ import annotations

import numpy as np
import optuna
import pytest

from nas.cli import main
from nas.early_stop import RungRule, dominated_by

NAMES = ["accuracy", "size_bytes"]


def test_dominated_by_counts_strict_dominance_only():
    peers = np.array([[0.9, 100], [0.8, 100], [0.95, 50], [0.8, 200]], dtype=float)
    assert dominated_by([0.8, 100], peers, ["maximize", "minimize"]) == 2  # ties do not dominate
    assert dominated_by([0.99, 10], peers, ["maximize", "minimize"]) == 0


def test_rung_rule_promotes_until_enough_peers_then_keeps_top_fraction():
    rule = RungRule(eta=3, min_peers=3)
    bad = [0.5, 1000.0]
    assert rule.verdict(2, bad, np.array([[0.9, 10.0], [0.9, 20.0]]), NAMES) is None  # too few peers
    # peers: a front of one (0.9, 10), then (0.8, 20) dominated once, (0.7, 30) twice
    peers = np.array([[0.9, 10.0], [0.8, 20.0], [0.7, 30.0]])
    reason = rule.verdict(2, bad, peers, NAMES)
    assert reason and "epoch 2" in reason and "dominated by 3 of 3" in reason
    # 4 points, keep ceil(4/3) = 2: (0.85, 15) is dominated once, only (0.9, 10) ranks better -> promoted
    assert rule.verdict(2, [0.85, 15.0], peers, NAMES) is None
    # (0.75, 25) is dominated twice; (0.9,10) and (0.8,20) rank better: 2 >= 2 -> stopped
    assert rule.verdict(2, [0.75, 25.0], peers, NAMES)
    # a point on the rung's front is always promoted, however many peers there are
    assert rule.verdict(2, [0.99, 50.0], np.tile(peers, (5, 1)), NAMES) is None


def test_rungs_are_fractions_of_the_budget():
    assert RungRule().rungs(8) == [2, 4]
    assert RungRule().rungs(1) == []
    assert RungRule(fractions=(0.5,)).rungs(10) == [5]


@pytest.mark.slow  # a long end-to-end run: deselected by default, CI runs it (`pytest -m slow`)
def test_search_with_early_stopping_records_pruned_trials_with_their_rung(in_tmp):
    db = f"sqlite:///{in_tmp}/e.db"
    # eta=100: keep only the rung's front (ceil(n/100) = 1 better-ranked point already stops)
    assert main(["search", "--trials", "8", "--epochs", "4", "--study", "e", "--storage", db, "--quiet",
                 "--objectives", "accuracy,params", "--sampler", "random", "--eta", "100", "--calibrate-rungs", "0"]) == 0
    study = optuna.load_study(study_name="e", storage=db)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 8
    for t in trials:
        assert "rung_1" in t.user_attrs  # rung 1 of 4 epochs (1/4), rung 2 (1/2)
        earlier = [p for p in trials if p.number < t.number]
        for rung in (1, 2):
            key = f"rung_{rung}"
            if key not in t.user_attrs:
                continue
            me = [t.user_attrs[key], t.user_attrs["costs"]["params"]]
            peers = np.array([[p.user_attrs[key], p.user_attrs["costs"]["params"]] for p in earlier if key in p.user_attrs])
            dominated = dominated_by(me, peers, ["maximize", "minimize"]) if len(peers) else 0
            stopped_here = t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get("rung_reached") == rung
            if dominated == 0 or len(peers) < 4:  # on the rung's front, or too few peers: always promoted
                assert not stopped_here, (t.number, rung)
            if stopped_here:
                assert "early-stopped at epoch" in t.user_attrs["fail_reason"]
    # with eta=100 the rule must have stopped someone (a rule that never stops passes the checks above)
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and "rung_reached" in t.user_attrs]
    assert stopped, "eta=100 stopped no trial"


def test_no_early_stop_trains_everything(in_tmp):
    db = f"sqlite:///{in_tmp}/n.db"
    assert main(["search", "--trials", "3", "--epochs", "2", "--study", "n", "--storage", db, "--quiet",
                 "--no-early-stop"]) == 0
    study = optuna.load_study(study_name="n", storage=db)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert not any(k.startswith("rung_") for t in study.trials for k in t.user_attrs)


def test_mnasnet_reward_search_is_single_objective(in_tmp, capsys):
    db = f"sqlite:///{in_tmp}/w.db"
    assert main(["search", "--trials", "2", "--epochs", "1", "--study", "w", "--storage", db, "--quiet",
                 "--reward", "hard", "--reward-target", "0.01"]) == 0
    study = optuna.load_study(study_name="w", storage=db)
    assert study.user_attrs["nas"]["objectives"] == ["reward"]
    for t in study.trials:
        acc, lat = t.user_attrs["accuracy"], t.user_attrs["latency_ms"]
        expected = acc if lat <= 0.01 else acc * (lat / 0.01) ** -1
        assert t.value == pytest.approx(expected)
    capsys.readouterr()
    assert main(["search", "--reward", "soft", "--storage", db, "--study", "w2"]) == 2
    assert "--reward needs --reward-target" in capsys.readouterr().err
