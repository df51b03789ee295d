from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nas.pipeline as pipeline
from nas.config import ArchConfig, BlockConfig, Candidate, Recipe
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
    assert m["onnx_graph_reused"] is True  # the pre-flight graph, re-weighted with the trained weights
    assert m["val_accuracy"] == pytest.approx(m["packed_val_accuracy"], abs=1e-6)  # fp32: the ONNX model is the packed model


def test_exported_graph_is_reweighted_or_exported_afresh(tmp_path, monkeypatch):
    from nas.builder import build
    from nas.compress.passes import onnx_predict
    from nas.config import ArchConfig
    from nas.measure import Exported

    arch = _candidate().arch
    x = torch.randn(6, 1, 8, 8)
    torch.manual_seed(0)
    exported = Exported(build(arch).eval(), torch.zeros(1, 1, 8, 8))

    def check(model, name, reused):
        path, was = exported.save_with(model.eval(), tmp_path / name, x)
        assert was is reused
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(onnx_predict(path, x)), model(x), atol=1e-4)

    torch.manual_seed(1)
    check(build(arch), "same_shape.onnx", True)
    wider = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("dsconv", 32, 3, 1, stage=0), BlockConfig("conv", 24, 3, 2, stage=1)))
    check(build(wider), "other_shape.onnx", False)
    # weights that did not reach the graph are caught by the output check, and the model is exported afresh
    monkeypatch.setattr(torch.onnx.ONNXProgram, "apply_weights", lambda self, state: None)
    torch.manual_seed(2)
    check(build(arch), "stale.onnx", False)
    monkeypatch.undo()
    # a shortcut that breaks (here: ONNX Runtime refuses the file) falls back too, leaving no stray file
    import nas.measure

    def broken(*a, **k):
        raise RuntimeError("Type Error")

    monkeypatch.setattr(nas.measure, "_session", broken)
    path, was = exported.save_with(build(arch).eval(), tmp_path / "broken.onnx", x)
    assert not was and path.is_file() and not list(tmp_path.glob("*.reused"))


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
