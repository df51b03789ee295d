"""Devices (issue 27): --device / --amp reach everything that trains in a trial; a device the host
lacks is one line. Runs on the CPU: the CUDA path itself is exercised by experiments/gpu_check.py."""

from __future__ import annotations

import threading

import pytest
import torch

from nas.cli import main
from nas.config import Candidate, CompressionConfig, Recipe
from nas.device import Placement, on_device, placement, resolve_device
from nas.errors import ConfigError
from nas.pipeline import Task, evaluate


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(ConfigError, match="--device cuda: this host has no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"--device 'tpu' is not allowed \(allowed: auto, cpu, cuda, cuda:N, mps\)"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="is not allowed"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match=r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host has CUDA")
@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "--device cuda: this host has no CUDA device"),
    (["--device", "cuda:3"], "no CUDA device"),
    (["--gpus-per-trial", "0.5"], "--gpus-per-trial is for --backend ray"),
    (["--backend", "ray", "--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5: this host has no CUDA device"),
])
def test_a_device_the_host_lacks_is_one_line(in_tmp, capsys, argv, message):
    assert main(["search", "--trials", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").rglob("*.db"))


def test_negative_or_infinite_gpus_are_refused(capsys):
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(SystemExit):
            main(["search", "--gpus-per-trial", bad])
        assert "a number of GPUs in 0..64" in capsys.readouterr().err


def test_every_training_of_a_trial_runs_with_its_placement(monkeypatch, tmp_path):
    """Training, the distillation teacher and fine-tuning after pruning all read the trial's
    device and autocast setting (here the CPU with bfloat16 autocast)."""
    import nas.train

    seen = []
    real = nas.train.train

    def spy(*a, **k):
        seen.append(placement())
        return real(*a, **k)

    monkeypatch.setattr(nas.train, "train", spy)
    for mod in ("nas.pipeline", "nas.compress.passes", "nas.compress.distill"):
        monkeypatch.setattr(f"{mod}.train", spy, raising=False)
    import optuna

    from nas.space import load_space

    cand = load_space("default").suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask(),
                                         in_channels=1, input_size=(8, 8), num_classes=10)
    cand = Candidate(cand.arch, CompressionConfig(prune="l1", prune_ratio=0.5, finetune_epochs=1, distill_alpha=0.5),
                     Recipe(epochs=1))
    task = Task(dataset="digits", amp=True, device="cpu", teacher_epochs=1, artifacts_dir=str(tmp_path))
    res = evaluate(cand, task)
    assert len(seen) >= 3 and all(p == Placement("cpu", True) for p in seen)  # teacher, training, fine-tuning
    assert 0.0 <= res.objectives["accuracy"] <= 1.0
    assert placement() == Placement()  # restored after the trial


def test_threads_keep_their_own_placement():
    got = {}
    barrier = threading.Barrier(2)

    def run(amp: bool) -> None:
        with on_device("cpu", amp):
            barrier.wait()
            got[amp] = placement().amp

    threads = [threading.Thread(target=run, args=(a,)) for a in (True, False)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == {True: True, False: False}


def test_bf16_autocast_trains_on_the_cpu():
    from nas.data import load_dataset
    from nas.train import accuracy, train

    data = load_dataset("digits", 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with on_device("cpu", amp=True):
        stats = train(model, data.x_train, data.y_train, Recipe(epochs=8, lr=0.01), 0)
    assert stats.final_loss < 1.0 and accuracy(model, data.x_val, data.y_val) > 0.85
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay float32
