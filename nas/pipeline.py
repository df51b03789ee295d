"""The single trial pipeline that every backend calls: ``evaluate(candidate, task)``.

1. pre-flight: build the final-shape model, export it to ONNX, measure latency / size /
   FLOPs / params; a violated hard constraint rejects the candidate before any training
   (costs do not depend on weight values);
2. train within the recipe's epoch budget;
3. score accuracy on the validation split (the objective) and the test split (reported).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from nas.builder import build
from nas.config import ArchConfig, Candidate
from nas.data import Dataset, load_dataset
from nas.errors import ConfigError, TrialFailure
from nas.measure import count_flops, count_params, export_onnx, onnx_latency
from nas.objectives import DEFAULT_OBJECTIVES, check_constraints
from nas.train import accuracy, seed_everything, train

__all__ = ["Task", "TrialResult", "ConstraintViolation", "evaluate", "get_dataset", "measure_costs"]


class ConstraintViolation(TrialFailure):
    """A hard constraint failed in pre-flight: the trial is pruned, not trained."""


@dataclass(frozen=True)
class Task:
    """What every trial of a study shares: data, objectives, limits, measurement settings."""

    dataset: str = "digits"
    seed: int = 0
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    constraints: dict[str, float] = field(default_factory=dict)
    latency_threads: int = 1
    train_threads: int | None = None
    epochs: int | None = None
    artifacts_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objectives"] = list(self.objectives)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        try:
            d = dict(d)
            d["objectives"] = tuple(d.get("objectives", DEFAULT_OBJECTIVES))
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"task: cannot read task record ({exc})") from exc


@dataclass
class TrialResult:
    objectives: dict[str, float]
    metrics: dict[str, Any]
    artifact_dir: str | None = None


@functools.lru_cache(maxsize=8)
def get_dataset(name: str, seed: int) -> Dataset:
    """Load once per process; every trial of a study reuses the same tensors."""
    return load_dataset(name, seed)


def _check_shapes(arch: ArchConfig, data: Dataset) -> None:
    if arch.in_channels != data.in_channels or tuple(arch.input_size) != data.input_size:
        raise TrialFailure(
            f"candidate expects input {arch.in_channels}x{arch.input_size}, dataset {data.name} gives "
            f"{data.in_channels}x{data.input_size}"
        )
    if arch.num_classes != data.num_classes:
        raise TrialFailure(f"candidate has {arch.num_classes} classes, dataset {data.name} has {data.num_classes}")


def save_weights(model: nn.Module, path: Path) -> int:
    """Write the weights file atomically and return its length in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


def measure_costs(model: nn.Module, example: torch.Tensor, workdir: Path, threads: int = 1) -> dict[str, Any]:
    """Every cost of the shipped form of ``model``: exported ONNX latency, file bytes, FLOPs."""
    onnx_path = export_onnx(model, example, workdir / "model.onnx")
    lat = onnx_latency(onnx_path, tuple(example.shape), threads=threads)
    size = save_weights(model, workdir / "weights.safetensors")
    return {
        "latency_ms": lat.median_ms,
        "latency_iqr_ms": lat.iqr_ms,
        "latency_noisy": lat.noisy,
        "latency_attempts": lat.attempts,
        "latency_threads": lat.threads,
        "size_bytes": size,
        "onnx_bytes": onnx_path.stat().st_size,
        "flops": count_flops(model, example),
        "params": count_params(model),
    }


def evaluate(
    candidate: Candidate,
    task: Task,
    *,
    trial_id: str | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> TrialResult:
    """Pre-flight costs, constraints, training, accuracy: one trial, whatever the backend.

    Raises :class:`ConstraintViolation` (reject without training) or :class:`TrialFailure`.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if task.train_threads:
        torch.set_num_threads(task.train_threads)
    data = get_dataset(task.dataset, task.seed)
    _check_shapes(candidate.arch, data)
    seed_everything(task.seed)
    try:
        model = build(candidate.arch)
        example = torch.zeros(1, data.in_channels, *data.input_size)
        model.eval()
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError) as exc:
        raise TrialFailure(f"infeasible architecture: {exc}") from exc

    with tempfile.TemporaryDirectory(prefix="nas-trial-") as tmp:
        costs = measure_costs(model, example, Path(tmp), task.latency_threads)
    timings["preflight_s"] = time.perf_counter() - t0
    reason = check_constraints(costs, task.constraints)
    if reason:
        raise ConstraintViolation(reason)

    t1 = time.perf_counter()
    recipe = candidate.recipe if task.epochs is None else dataclasses.replace(candidate.recipe, epochs=task.epochs)
    stats = train(model, data.x_train, data.y_train, recipe, task.seed, on_epoch=on_epoch)
    timings["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    val_acc = accuracy(model, data.x_val, data.y_val)
    test_acc = accuracy(model, data.x_test, data.y_test)
    artifact_dir = None
    if task.artifacts_dir and trial_id is not None:
        out = Path(task.artifacts_dir) / trial_id
        out.mkdir(parents=True, exist_ok=True)
        save_weights(model, out / "weights.safetensors")
        artifact_dir = str(out)
    timings["eval_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    objectives = {"accuracy": val_acc, **{k: float(costs[k]) for k in ("latency_ms", "size_bytes", "flops", "params")}}
    metrics = {
        **costs,
        "accuracy": val_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "epochs": stats.epochs,
        "final_loss": stats.final_loss,
        **timings,
    }
    return TrialResult(objectives, metrics, artifact_dir)
