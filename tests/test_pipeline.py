from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import nas.pipeline as pipeline
from nas.cli import main
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.errors import TrialFailure
from nas.pipeline import ConstraintViolation, Task, evaluate
from nas.train import train


def _candidate(epochs: int = 4) -> Candidate:
    arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("dsconv", 16, 3, 1, stage=0), BlockConfig("conv", 24, 3, 2, stage=1)))
    return Candidate(arch, recipe=Recipe(epochs=epochs, lr=0.01))


def test_evaluate_measures_costs_and_learns(tmp_path):
    task = Task(dataset="digits", artifacts_dir=str(tmp_path))
    res = evaluate(_candidate(), task, trial_id="t0")
    m = res.metrics
    assert m["val_accuracy"] > 0.6 and m["test_accuracy"] > 0.6  # chance is 0.1
    assert m["latency_ms"] > 0 and m["latency_iqr_ms"] >= 0 and m["flops"] > 0 and m["params"] > 0
    weights = Path(res.artifact_dir) / "weights.nasp"
    assert weights.is_file() and weights.stat().st_size == m["size_bytes"] == res.objectives["size_bytes"]
    assert set(res.objectives) == {"accuracy", "latency_ms", "size_bytes", "flops", "params"}
    assert m["onnx_exporter"] == "torchscript"  # the fast exporter's graph passed its check against the model
    assert m["val_accuracy"] == pytest.approx(m["packed_val_accuracy"], abs=1e-6)  # fp32: the ONNX model is the packed model


def test_a_failing_fast_export_falls_back_to_the_torch_export_exporter(tmp_path, monkeypatch):
    import torch

    def broken(*a, **k):
        if not k.get("dynamo", True):
            raise RuntimeError("no TorchScript exporter here")
        return real(*a, **k)

    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", broken)
    res = evaluate(_candidate(2), Task(dataset="digits", artifacts_dir=str(tmp_path)), trial_id="t")
    assert res.metrics["onnx_exporter"] == "dynamo"
    assert res.metrics["val_accuracy"] == pytest.approx(res.metrics["packed_val_accuracy"], abs=1e-6)


def test_evaluate_is_reproducible_except_latency():
    task = Task(dataset="digits")
    a = evaluate(_candidate(2), task).metrics
    b = evaluate(_candidate(2), task).metrics
    for k in ("val_accuracy", "test_accuracy", "size_bytes", "flops", "params", "final_loss"):
        assert a[k] == b[k], k


def test_constraint_rejects_before_training(monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a rejected candidate must not be trained")

    monkeypatch.setattr(pipeline, "train", no_training)
    with pytest.raises(ConstraintViolation, match=r"size_bytes \d+ > max 1000"):
        evaluate(_candidate(), Task(dataset="digits", constraints={"size_bytes": 1000}))


def test_non_finite_loss_is_a_trial_failure():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(32, 1, 8, 8)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(TrialFailure, match="non-finite loss"):
        train(model, x, torch.zeros(32, dtype=torch.long), Recipe(epochs=1, batch_size=32), seed=0)


def test_candidate_for_another_input_shape_fails_cleanly():
    cand = _candidate()
    with pytest.raises(TrialFailure, match="dataset mnist1d gives"):
        evaluate(cand, Task(dataset="mnist1d"))


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
    assert a["deploy_precision"] == "int8" and a["onnx_exporter"] == "torchscript"  # pruned+sparse, int4 QDQ


def test_timings_are_scaled_to_the_study_reference_floor(monkeypatch, tmp_path):
    """A host twice as slow right now (its runtime floor doubled) gives the same latency figure."""
    from nas.measure import Latency
    from nas.pipeline import timed

    path = tmp_path / "m.onnx"
    example = torch.zeros(1, 1, 8, 8)
    for raw, floor in ((0.02, 0.005), (0.04, 0.010)):
        monkeypatch.setattr("nas.pipeline.onnx_latency", lambda p, s, *, threads, r=raw, f=floor: Latency(r, r / 20, 500, threads, 1, f))
        lat = timed(path, example, Task(latency_floor_ms=0.005))
        assert lat["latency_ms"] == pytest.approx(0.02) and lat["latency_raw_ms"] == raw
        assert lat["latency_floor_ms"] == 0.005 and lat["latency_floor_now_ms"] == floor


def test_a_new_study_records_its_reference_floor_and_resumes_keep_it(tmp_path):
    import optuna

    from nas.cli import main

    db = f"sqlite:///{tmp_path}/f.db"
    args = ["search", "--trials", "1", "--epochs", "1", "--study", "f", "--storage", db, "--quiet",
            "--artifacts", str(tmp_path / "a")]
    assert main(args) == 0
    study = optuna.load_study(study_name="f", storage=db)
    floor = study.user_attrs["nas"]["task"]["latency_floor_ms"]
    assert 0 < floor < 1 and study.trials[0].user_attrs["latency_floor_ms"] == floor
    args[2] = "2"
    assert main(args) == 0
    assert optuna.load_study(study_name="f", storage=db).trials[1].user_attrs["latency_floor_ms"] == floor


def test_epochs_bounds_the_teacher_and_every_fine_tuning_pass(tmp_path, monkeypatch):
    """--epochs 1 with a 20-epoch teacher and 5 fine-tuning epochs: nothing trains longer than 1."""
    import dataclasses

    import nas.compress.distill as distill
    import nas.compress.passes as passes

    seen = []
    real_train = passes.train

    def recording(model, x, y, recipe, *a, **k):
        seen.append(("finetune", recipe.epochs))
        return real_train(model, x, y, recipe, *a, **k)

    real_teachers = distill.get_teachers

    def teachers(folder, data, n=1, epochs=20):
        seen.append(("teacher", epochs))
        return real_teachers(folder, data, n, epochs)

    monkeypatch.setattr(passes, "train", recording)
    monkeypatch.setattr(distill, "get_teachers", teachers)
    cand = _candidate(epochs=6)
    cand = dataclasses.replace(cand, compression=CompressionConfig(quant="int4", finetune_epochs=5, distill_alpha=0.5))
    res = evaluate(cand, Task(dataset="digits", epochs=1, teacher_epochs=20, artifacts_dir=str(tmp_path)), trial_id="t")
    assert res.metrics["epochs"] == 1
    assert ("teacher", 1) in seen and ("finetune", 1) in seen
    assert all(e <= 1 for _, e in seen), seen


def test_the_data_fraction_screen_is_rung_zero_and_can_stop_a_trial_before_full_training(tmp_path, monkeypatch):
    from nas.early_stop import EarlyStopped

    calls = []

    def at_rung(epoch, acc, costs):
        calls.append((epoch, acc))
        if epoch == 0:
            raise EarlyStopped("stopped at the screen", 0)

    seen_sizes = []
    real = pipeline.train

    def recording(model, x, y, recipe, *a, **k):
        seen_sizes.append(len(y))
        return real(model, x, y, recipe, *a, **k)

    monkeypatch.setattr(pipeline, "train", recording)
    task = Task(dataset="digits", early_stop={"calibrate": 0}, screen=0.25)
    with pytest.raises(EarlyStopped):
        evaluate(_candidate(epochs=2), task, at_rung=at_rung)
    n_train = len(pipeline.get_dataset("digits", 0).y_train)
    assert seen_sizes == [round(n_train * 0.25)]  # only the screen trained, on a quarter of the data
    assert calls[0][0] == 0 and 0.0 <= calls[0][1] <= 1.0 and len(calls) == 1
    # promoted: the screen, then full training on all of it, with its rungs
    seen_sizes.clear()
    calls.clear()
    progress = []
    res = evaluate(_candidate(epochs=4), task, at_rung=lambda e, a, c: calls.append((e, a)), progress=progress.append)
    assert seen_sizes == [round(n_train * 0.25), n_train] and [e for e, _ in calls] == [0, 1, 2]
    assert res.metrics["screen_s"] > 0 and "screen 2/4" in progress and "epoch 4/4" in progress
    # the same subset for every trial of a study (seeded), another for another seed
    assert torch.equal(pipeline.screen_indices(100, 0.2, 0), pipeline.screen_indices(100, 0.2, 0))
    assert not torch.equal(pipeline.screen_indices(100, 0.2, 0), pipeline.screen_indices(100, 0.2, 1))


def test_defaults_follow_the_data_screen_threads_and_space():
    from nas.space import default_space_name

    assert pipeline.auto_screen(51_000) == 0.125 and pipeline.auto_screen(1_221) == 0.0
    cores = pipeline.default_train_threads(1)
    assert cores >= 1 and pipeline.default_train_threads(2) == max(1, cores // 2)
    assert pipeline.default_train_threads(10_000) == 1
    assert default_space_name("2d", (8, 8)) == "default" and default_space_name("2d", (16, 16)) == "default"
    assert default_space_name("2d", (28, 28)) == "default28" and default_space_name("2d", (32, 24)) == "default28"
    assert default_space_name("1d", (1, 40)) == "mnist1d"


@pytest.mark.parametrize("cfg", [CompressionConfig(), CompressionConfig(quant="int8"),
                                 CompressionConfig(quant="int8", weight_only=True)], ids=["fp32", "int8", "int8-w-only"])
def test_the_preflight_graph_is_the_graph_that_ships(cfg, tmp_path):
    """Pre-flight times an untrained model in its final shape; the shipped one must be the same
    graph as ONNX Runtime runs it. Untrained BatchNorms folded to equal biases were stored once
    behind Identity nodes, and the int8 quantizer then left two of five convolutions in float:
    pre-flight timed (and its latency was kept when faster) a graph that never shipped."""
    import onnx

    from nas.compress.deploy import deploy_onnx
    from nas.compress.passes import compress, load_packed, pack_model, trained_model
    from nas.latency_model import runtime_nodes
    from nas.pipeline import get_dataset, preview_model

    data = get_dataset("digits", 0)
    arch = ArchConfig(1, 10, (8, 8), "2d", 16, (BlockConfig("conv", 24, 3, 1, stage=0),
                                                BlockConfig("mbconv", 24, 3, 2, 2, stage=1)))
    cand = Candidate(arch, cfg, Recipe(epochs=1))
    example, calibration = data.x_train[:1], data.x_train[:64]
    preview, _ = preview_model(cand, data, 0, example)
    pre = deploy_onnx(preview, cfg, example, tmp_path / "pre.onnx", calibration, normalize=data.normalization)[0]
    model = trained_model(cand)
    train(model, data.x_train, data.y_train, cand.recipe, seed=0)
    shipped = load_packed(cand, pack_model(compress(model, cand, data, 0, finetune=False), cfg))
    ship = deploy_onnx(shipped, cfg, example, tmp_path / "ship.onnx", calibration, normalize=data.normalization)[0]
    ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (pre, ship)]
    assert ops[0] == ops[1] and "Identity" not in ops[0]
    assert runtime_nodes(pre) == runtime_nodes(ship)
