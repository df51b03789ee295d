"""Backend-neutral trial bookkeeping (nas.trial): outcomes and rung records in the storage."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from nas.early_stop import EarlyStopped, RungRule, spearman_lower_bound
from nas.errors import TrialFailure
from nas.pipeline import ConstraintViolation
from nas.trial import outcome, record_rung_and_judge, rung_names


def test_outcomes_map_to_states_with_reasons():
    assert outcome(EarlyStopped("stopped", 2)) == ("PRUNED", {"fail_reason": "stopped", "rung_reached": 2})
    assert outcome(ConstraintViolation("too big")) == ("PRUNED", {"fail_reason": "too big"})
    # a rejected candidate keeps its measured costs (a sampler learns where the limits bite)
    assert outcome(ConstraintViolation("too big", {"size_bytes": 9e4, "latency_ms": 0.02, "val_accuracy": 0.5})) == (
        "PRUNED", {"fail_reason": "too big", "costs": {"size_bytes": 9e4, "latency_ms": 0.02}})
    assert outcome(TrialFailure("nan loss")) == ("FAIL", {"fail_reason": "nan loss"})
    assert outcome(ValueError("bug")) == ("FAIL", {"fail_reason": "ValueError: bug"})


def test_rung_records_live_in_the_storage_and_are_judged_against_it(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db", directions=["maximize", "minimize"])
    names = rung_names(("accuracy", "latency_ms", "size_bytes"))
    assert names == ["accuracy", "latency_ms", "size_bytes"]
    rule = RungRule(min_peers=2, calibrate=0)
    costs = {"latency_ms": 0.01, "size_bytes": 100.0, "flops": 1.0, "params": 1.0}
    verdicts = []
    for acc in (0.9, 0.95, 0.5):
        t = study.ask()
        verdicts.append(record_rung_and_judge(study, t._trial_id, t.number, rule, names, 2, acc, costs))
    assert verdicts[:2] == [None, None]  # too few peers, then on the rung's front
    assert verdicts[2] and "early-stopped at epoch 2" in verdicts[2]  # dominated by both at equal costs
    assert [tr.user_attrs["rung_2"] for tr in study.get_trials()] == [0.9, 0.95, 0.5]


def _finished(study, rung_acc, final):
    for r, f in zip(rung_acc, final):
        t = study.ask()
        t.set_user_attr("rung_2", float(r))
        t.set_user_attr("val_accuracy", float(f))
        t.set_user_attr("costs", {"latency_ms": 0.01, "size_bytes": 100.0})
        study.tell(t, [float(f), 0.01])


@pytest.mark.parametrize(("final", "stops"), [
    (np.linspace(0.5, 0.95, 12), True),  # rung order = final order: the rung predicts, it may stop
    (np.linspace(0.5, 0.95, 12)[[7, 2, 11, 0, 9, 4, 1, 10, 5, 3, 8, 6]], False),  # shuffled: it does not
])
def test_a_rung_stops_trials_only_where_it_predicted_the_final_accuracy(tmp_path, final, stops):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", directions=["maximize", "minimize"])
    names = ["accuracy", "latency_ms"]
    rule = RungRule(min_peers=2, calibrate=12)
    costs = {"latency_ms": 0.01}
    _finished(study, np.linspace(0.3, 0.9, 11), final[:11])
    t = study.ask()  # 11 finished trials: still calibrating, a poor trial goes on
    assert record_rung_and_judge(study, t._trial_id, t.number, rule, names, 2, 0.1, costs) is None
    assert study.trials[t.number].user_attrs["rung_2_rule"] == "calibrating (11 of 12 finished trials)"
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    _finished(study, [0.95], final[11:])
    t = study.ask()
    verdict = record_rung_and_judge(study, t._trial_id, t.number, rule, names, 2, 0.1, costs)
    rule_text = study.trials[t.number].user_attrs["rung_2_rule"]
    assert bool(verdict) is stops and rule_text.startswith("on: " if stops else "off: ")
    assert "first 12 finished trials" in rule_text


def test_a_high_estimate_from_few_trials_is_not_enough():
    rung = np.arange(12) / 20
    # Spearman 0.61 over 12 trials: its 80% lower bound is 0.39, so the rung does not stop anything
    use, why = RungRule().calibration(list(zip(rung, np.array([4, 0, 2, 3, 1, 9, 10, 11, 6, 5, 7, 8]) / 20)))
    assert not use and why == ("off: Spearman 0.61 between rung and final accuracy over the first 12 finished "
                               "trials, lower 80% bound 0.39 (needs 0.5)")
    use, why = RungRule().calibration(list(zip(rung, np.array([2, 3, 5, 0, 4, 1, 9, 6, 7, 8, 11, 10]) / 20)))
    assert use and "Spearman 0.80" in why and "bound 0.68" in why
    # the same 0.61 from 40 trials is evidence enough
    assert spearman_lower_bound(0.61, 40) > 0.5 > spearman_lower_bound(0.61, 12)
    assert spearman_lower_bound(1.0, 12) == pytest.approx(1.0, abs=1e-3)
    assert spearman_lower_bound(0.0, 5) < 0


def test_calibration_edge_cases():
    assert RungRule(calibrate=0).calibration([]) == (True, "on")
    assert RungRule(calibrate=3).calibration([(0.5, 0.5)] * 3)[0] is False  # no spread: no evidence, no stopping
    use, why = RungRule(calibrate=3).calibration([(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.0, 0.9)])
    assert use and "Spearman 1.00" in why  # only the first 3 finished trials decide
