"""The Optuna backend: resume after a killed worker, retries, journal storage shared by processes, failures recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from torch import nn

from nas.backends.optuna import make_objective, make_sampler, recover_dead_trials
from nas.blocks import BLOCKS, register_block
from nas.pipeline import Task
from nas.space import parse_space


def test_sigkill_mid_trial_then_resume(in_tmp):
    db = f"sqlite:///{in_tmp}/k.db"
    args = [sys.executable, "-m", "nas.cli", "search", "--trials", "5", "--epochs", "6", "--study", "k",
            "--storage", db, "--quiet", "--no-early-stop", "--sampler", "random"]
    proc = subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_running = None
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            study, trials = _states(db, "k")
        except (KeyError, Exception):
            continue
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "candidate" in t.user_attrs]
        if len(done) >= 2 and running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_running = running[0].number
            break
    assert killed_running is not None, "never caught the search mid-trial"
    before = {t.number: t.values for t in _states(db, "k")[1] if t.state == optuna.trial.TrialState.COMPLETE}

    resumed = subprocess.run(args, cwd=in_tmp, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study, trials = _states(db, "k")
    killed = study.trials[killed_running]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["killed"]
    assert "died during the trial" in killed.user_attrs["fail_reason"]
    complete = {t.number: t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    for number, values in before.items():
        assert complete[number] == values  # no completed trial lost or changed
    counted = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(counted) == 5  # --trials is the total across resumes; the killed one does not count
    retry = [t for t in trials if t.system_attrs.get("retry_of") == killed_running]
    assert len(retry) == 1 and retry[0].params == killed.params  # retried once, same candidate
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_dead_trial_is_retried_once_even_when_two_processes_recover_it(tmp_path, monkeypatch):
    import socket

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db", study_name="r")
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    assert recover_dead_trials(study) == [trial.number]
    # a second process that listed the RUNNING trials before the first one recovered them
    monkeypatch.setattr(study, "get_trials", lambda **kw: stale)
    assert recover_dead_trials(study) == []
    monkeypatch.undo()
    by_state = {s: [t for t in study.get_trials() if t.state == s] for s in optuna.trial.TrialState}
    assert [t.number for t in by_state[optuna.trial.TrialState.FAIL]] == [trial.number]
    assert by_state[optuna.trial.TrialState.FAIL][0].user_attrs["killed"] is True
    waiting = by_state[optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == {"x": trial.params["x"]}
    assert waiting[0].system_attrs["retry_of"] == trial.number
    assert [t.number for t in by_state[optuna.trial.TrialState.RUNNING]] == [alive.number]


def test_two_worker_processes_share_a_journal_study(in_tmp):
    log = str(in_tmp / "study.log")
    args = [sys.executable, "-m", "nas.cli", "search", "--trials", "6", "--epochs", "1", "--study", "p",
            "--storage", log, "--quiet", "--no-early-stop", "--sampler", "random"]
    procs = [subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert "database is locked" not in err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="p", storage=JournalStorage(JournalFileBackend(log)))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # unique, none missing
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both processes did work
    assert 6 <= len(study.trials) <= 7  # each stops at 6 finished; at most one in flight overshoots


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path):
    register_block("test_boom")(_Boom)  # registered only for this test
    register_block("test_nan")(_NaN)
    try:
        space = parse_space({"name": "f", "stem_channels": 8, "stages": [
            {"block": ["conv", "test_boom", "test_nan"], "width": 8, "stride": 2}], "recipe": {"epochs": 1}})
        task = Task(dataset="digits", artifacts_dir=str(tmp_path))
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                    sampler=make_sampler("random", 0, 3))
        for block in ("test_boom", "conv", "test_nan"):
            study.enqueue_trial({"s0.block": block})
        study.optimize(make_objective(space, task), n_trials=3, catch=(Exception,))
        by_block = {t.params["s0.block"]: t for t in study.trials}
        assert by_block["conv"].state == optuna.trial.TrialState.COMPLETE
        assert by_block["test_boom"].state == optuna.trial.TrialState.FAIL
        assert by_block["test_boom"].user_attrs["fail_reason"] == "RuntimeError: boom in a block"
        assert by_block["test_nan"].state == optuna.trial.TrialState.FAIL
        assert "non-finite loss" in by_block["test_nan"].user_attrs["fail_reason"]
    finally:
        BLOCKS.pop("test_boom", None)
        BLOCKS.pop("test_nan", None)


def _states(db, name):
    study = optuna.load_study(study_name=name, storage=db)
    return study, [t for t in study.trials]


class _Boom(nn.Module):
    def __init__(self, cin, cfg, spatial):
        super().__init__()
        self.conv = nn.Conv2d(cin, cfg.out_channels, 1)

    def forward(self, x):
        if self.training:
            raise RuntimeError("boom in a block")
        return self.conv(x)


class _NaN(nn.Module):
    def __init__(self, cin, cfg, spatial):
        super().__init__()
        self.conv = nn.Conv2d(cin, cfg.out_channels, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * float("nan") if self.training else y
