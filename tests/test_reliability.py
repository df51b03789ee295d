from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from nas.backends.optuna import make_objective, make_sampler, recover_dead_trials
from nas.blocks import BLOCKS, register_block
from nas.cli import main
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.data import load_dataset
from nas.errors import TrialFailure, DataError, SpaceError
from nas.pipeline import Task, evaluate
from nas.space import parse_space


def _states(db, name):
    study = optuna.load_study(study_name=name, storage=db)
    return study, [t for t in study.trials]


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


def test_infeasible_shape_and_memory_limit_fail_in_preflight(in_tmp, capsys):
    deep = ArchConfig(1, 10, (8, 8), "2d", 8, tuple(BlockConfig("conv", 8, 3, 2, stage=i) for i in range(5)))
    with pytest.raises(TrialFailure, match=r"infeasible shape: block 3 .* downsamples a 1x1 feature map"):
        evaluate(Candidate(deep), Task())
    small = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 8, 3, 1),))
    with pytest.raises(TrialFailure, match=r"over the memory limit: training needs ~[\d.]+ MB > max 0 MB"):
        evaluate(Candidate(small), Task(max_memory_mb=0.0001))
    (in_tmp / "deep.yaml").write_text(yaml.safe_dump({"stem_channels": 8, "stages": [
        {"block": "conv", "width": 8, "stride": 2}] * 5}))
    db = f"sqlite:///{in_tmp}/d.db"
    assert main(["search", "--space", "deep.yaml", "--trials", "1", "--study", "d", "--storage", db, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["front", "d", "--storage", db, "--all", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["state"] == "FAIL" and "infeasible shape" in row["fail_reason"]


def test_same_seed_same_accuracy_and_size_with_compression():
    arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 1, stage=0), BlockConfig("mbconv", 16, 3, 2, 2, stage=1)))
    cand = Candidate(arch, CompressionConfig(prune="l1", prune_ratio=0.25, quant="int4", huffman=True, sparsity=0.3,
                                             finetune_epochs=1), Recipe(epochs=2))
    a, b = evaluate(cand, Task()).metrics, evaluate(cand, Task()).metrics
    for k in ("val_accuracy", "test_accuracy", "size_bytes", "params", "flops"):
        assert a[k] == b[k], k
    assert a["deploy_precision"] == "int8" and a["onnx_graph_reused"]  # pruned+sparse graph re-weighted, not re-exported


def test_experiment_config_file(in_tmp, capsys):
    (in_tmp / "exp.yaml").write_text("trials: 1\nepochs: 1\nobjectives: [accuracy, params]\nsampler: random\nstudy: c\n")
    db = f"sqlite:///{in_tmp}/c.db"
    assert main(["search", "--config", "exp.yaml", "--storage", db, "--quiet"]) == 0
    study = optuna.load_study(study_name="c", storage=db)
    assert study.user_attrs["nas"]["objectives"] == ["accuracy", "params"] and len(study.trials) == 1
    (in_tmp / "bad.yaml").write_text("trials: 1\ncolour: red\n")
    assert main(["search", "--config", "bad.yaml", "--storage", db]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    (in_tmp / "bad2.yaml").write_text("trials: many\n")
    assert main(["search", "--config", "bad2.yaml", "--storage", db]) == 2
    assert "trials: 'many' is not an integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------- property-based

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["conv", "dsconv", "mbconv", "skip", "factorized", "gap", "2d", "1d"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(["low", "high", "step", "log", "x"]), inner, max_size=4)),
                       max_leaves=8)
_stage = st.dictionaries(st.one_of(st.sampled_from(["block", "depth", "width", "kernel", "stride", "expansion", "bogus"]),
                                   st.integers(0, 3)), _values, max_size=7)
_space = st.fixed_dictionaries({}, optional={
    "name": _values, "spatial": _values, "stem_channels": _values, "head": _values, "dropout": _values,
    "stages": st.one_of(_values, st.lists(_stage, max_size=3)),
    "recipe": st.one_of(_values, st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "weight_decay", "x"]), _values, max_size=3)),
    "compression": st.one_of(_values, st.dictionaries(st.sampled_from(["quant", "prune", "prune_ratio", "huffman", "per_stage", "share", "x"]), _values, max_size=4)),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_space)
def test_space_loader_accepts_or_raises_its_own_error(raw):
    try:
        space = parse_space(raw, "fuzz.yaml")
    except SpaceError:
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    cand = space.suggest(t, in_channels=1, input_size=(8, 8), num_classes=10)
    assert len(cand.arch.blocks) >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_space_yaml_text_fuzz(tmp_path, text):
    from nas.space import load_space

    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        space = load_space(str(p))
    except SpaceError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)  # names the file, one line
        return
    assert space.stages


_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)
_arrays = st.tuples(_shapes, st.sampled_from(["float32", "float64", "int64", "int8", "bool", "complex64", "U3"]),
                    st.sampled_from(["zeros", "ones", "neg", "nan", "rand"]))


def _make(spec):
    shape, dtype, fill = spec
    if dtype == "U3":
        return np.full(shape, "abc")
    a = np.random.default_rng(0).integers(0, 3, size=shape).astype(dtype) if fill == "rand" else np.zeros(shape, dtype)
    if fill == "ones":
        a = a + 1
    if fill == "neg" and dtype not in ("bool",):
        a = a - 2
    if fill == "nan" and np.dtype(dtype).kind in "fc":
        a = a + np.nan
    return a


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["x", "y", "x_test", "y_test", "z"]), _arrays, max_size=4))
def test_npz_loader_accepts_or_raises_its_own_error(tmp_path, arrays):
    p = tmp_path / "fuzz.npz"
    np.savez(p, **{k: _make(v) for k, v in arrays.items()})
    try:
        d = load_dataset(str(p))
    except DataError:
        return
    assert d.x_train.dtype == torch.float32 and len(d.y_train) > 0 and d.num_classes >= 2
