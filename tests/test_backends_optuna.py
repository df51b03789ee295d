"""The Optuna backend: resume after a killed worker, retries, journal storage shared by processes, failures recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from torch import nn

from nas.backends.optuna import make_objective, make_sampler, recover_dead_trials
from nas.blocks import BLOCKS, register_block
from nas.config import BLOCK_TYPES
from nas.pipeline import Task
from nas.space import parse_space


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
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
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")  # a live process
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


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
@pytest.mark.parametrize("storage", ["study.log", "sqlite:///p.db"])
def test_two_worker_processes_share_a_study_and_hold_its_total(in_tmp, storage):
    """Two `nas search` processes on one study (a journal file, or SQLite) share the work and stop
    at --trials exactly: they used to finish one more (each checked only after a trial)."""
    args = [sys.executable, "-m", "nas.cli", "search", "--trials", "4", "--epochs", "1", "--study", "p",
            "--storage", storage, "--quiet", "--no-early-stop", "--sampler", "random"]
    procs = [subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert "database is locked" not in err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="p", storage=JournalStorage(JournalFileBackend(str(in_tmp / storage)))
                              if storage.endswith(".log") else f"sqlite:///{in_tmp}/p.db")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # unique, none missing
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both processes did work
    assert len(study.trials) == 4  # a trial starts only while finished + running (both processes) < 4


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
        for name in ("test_boom", "test_nan"):
            BLOCKS.pop(name, None)
            BLOCK_TYPES.pop(name, None)


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


TINY = {"name": "tiny", "stem_channels": 8, "stages": [{"block": "conv", "width": [8, 16], "stride": 2}],
        "recipe": {"epochs": 1}, "early_stop": False}


def _nas_study(tmp_path, name="t"):
    from nas.backends.optuna import create_study
    from nas.study import open_storage

    space = parse_space(TINY)
    task = Task(dataset="digits", artifacts_dir=str(tmp_path / "art"), latency_floor_ms=0.001)
    storage = open_storage(f"sqlite:///{tmp_path}/t.db", create=True)
    return create_study(name, storage, task, space, make_sampler("random", 0)), space, task, storage


def test_no_trial_starts_while_finished_plus_running_trials_reach_the_total(tmp_path, monkeypatch):
    """Two searches on one study used to finish 7 trials for --trials 6: each stopped only after a
    trial, so with 5 finished and one running elsewhere the other started a 7th. A trial now
    starts only while finished + running (in live workers) < the total."""
    import socket

    import nas.backends.optuna as backend

    study, space, task, storage = _nas_study(tmp_path)
    for i in range(5):
        study.add_trial(optuna.trial.create_trial(values=[0.5, 0.01, 1000.0 + i]))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # another worker, still running
    try:
        probe = optuna.create_study().ask()  # a candidate of the space, as that worker drew it
        space.suggest(probe, in_channels=1, input_size=(8, 8), num_classes=10)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params=probe.params,
                                                  distributions=probe.distributions,
                                                  user_attrs={"worker": f"{socket.gethostname()}:{live.pid}"}))
        calls = []
        real = backend.evaluate
        monkeypatch.setattr(backend, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
        backend.run_optuna(space, task, study_name="t", storage=storage, sampler="random", n_trials=6)
        assert calls == [] and len(study.get_trials()) == 6  # the running one is the 6th: none started
    finally:
        live.kill()
        live.wait()
    # that worker died: its trial is failed and retried, once, to make the 6
    backend.run_optuna(space, task, study_name="t", storage=storage, sampler="random", n_trials=6)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 + ["FAIL", "COMPLETE"]
    assert trials[5].user_attrs["killed"] and trials[6].system_attrs["retry_of"] == 5
    assert trials[6].params == probe.params
    assert calls == [1] and backend.finished_count(study) == 6


def test_jobs_run_concurrent_trials_up_to_the_total(tmp_path):
    import nas.backends.optuna as backend

    study, space, task, storage = _nas_study(tmp_path)
    backend.run_optuna(space, task, study_name="t", storage=storage, sampler="random", n_trials=3, jobs=2)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert not backend.RUNNING_HERE


def test_a_running_trial_with_this_process_id_but_not_run_here_is_stale(tmp_path):
    """A pid is reused (containers restart with the same hostname and small pids), and an
    in-process caller may resume its own earlier search: such a RUNNING trial is recovered."""
    import socket

    study, *_ = _nas_study(tmp_path)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.RUNNING, params={"x": 1},
        distributions={"x": optuna.distributions.IntDistribution(0, 9)},
        user_attrs={"worker": f"{socket.gethostname()}:{os.getpid()}"}))
    assert recover_dead_trials(study) == [0]
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]


def test_progress_counts_interrupted_and_killed_trials_as_retried_not_done():
    import types

    from nas.progress import SearchProgress

    def t(state, **ua):
        return types.SimpleNamespace(number=0, state=getattr(optuna.trial.TrialState, state), values=None,
                                     duration=None, user_attrs=ua)

    trials = [t("COMPLETE"), t("FAIL", fail_reason="interrupted", interrupted=True),
              t("FAIL", fail_reason="worker h:1 died during the trial; retried", killed=True), t("FAIL"),
              t("FAIL", fail_reason="RuntimeError: boom"), t("RUNNING")]
    s = SearchProgress(["accuracy"], ["maximize"], 3, quiet=True)._state(trials)
    assert (s["done"], s["failed"], s["running"]) == (2, 1, 1)  # as finished_count: COMPLETE + a real failure
    assert s["retried"] == 3


def test_a_screen_its_calibration_turned_off_is_not_trained_again(tmp_path):
    """Once the first ``calibrate`` finished trials say the data-fraction screen does not predict
    final accuracy, it stops nothing for the rest of the study: later trials skip its training."""
    space = parse_space({"name": "s", "stem_channels": [8, 16], "stages": [
        {"block": ["conv", "dsconv"], "width": [8, 16], "stride": 2}], "recipe": {"epochs": 2}})
    # min_rho 1.0: no calibration can pass (the bound of a correlation is below 1), so it turns off
    task = Task(dataset="digits", early_stop={"calibrate": 3, "min_rho": 1.0}, screen=0.25, artifacts_dir=str(tmp_path))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler("random", 0, 5))
    study.optimize(make_objective(space, task), n_trials=5)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    first, later = trials[:3], trials[3:]
    assert all("rung_0" in t.user_attrs and t.user_attrs["screen_s"] > 0 for t in first)
    assert all("rung_0" not in t.user_attrs and t.user_attrs["screen_skipped"] == 1.0 and t.user_attrs["screen_s"] == 0
               for t in later)
