"""Backend-neutral trial bookkeeping (nas.trial): outcomes and rung records in the storage."""

from __future__ import annotations

import optuna

from nas.early_stop import EarlyStopped, RungRule
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
    rule = RungRule(min_peers=2)
    costs = {"latency_ms": 0.01, "size_bytes": 100.0, "flops": 1.0, "params": 1.0}
    verdicts = []
    for acc in (0.9, 0.95, 0.5):
        t = study.ask()
        verdicts.append(record_rung_and_judge(study, t._trial_id, t.number, rule, names, 2, acc, costs))
    assert verdicts[:2] == [None, None]  # too few peers, then on the rung's front
    assert verdicts[2] and "early-stopped at epoch 2" in verdicts[2]  # dominated by both at equal costs
    assert [tr.user_attrs["rung_2"] for tr in study.get_trials()] == [0.9, 0.95, 0.5]
