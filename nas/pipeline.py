"""The single trial pipeline that every backend calls: ``evaluate(candidate, task)``.

1. pre-flight: build the final compressed shape, export it to ONNX, measure latency / size /
   FLOPs / params; a violated hard constraint rejects the candidate before any training
   (costs do not depend on weight values);
2. train within the recipe's epoch budget;
3. compress (prune -> fine-tune -> low-rank -> sparsify/quantize -> cluster), pack the
   weights into the file whose length is ``size_bytes``, decode it back;
4. score the deployable ONNX artifact in ONNX Runtime on the validation split (the objective)
   and the test split (reported).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.builder import build
from nas.compress.distill import distill_loss_fn, get_teachers
from nas.compress.pack import write_file
from nas.compress.passes import compress, deploy_onnx, load_packed, onnx_predict, pack_model
from nas.compress.prune import slimming_penalty
from nas.config import ArchConfig, Candidate
from nas.data import Dataset, load_dataset
from nas.errors import ConfigError, TrialFailure
from nas.measure import Exported, count_flops, count_params, latency_host, onnx_latency
from nas.early_stop import RungRule
from nas.objectives import DEFAULT_OBJECTIVES, check_constraints, mnasnet_reward
from nas.train import accuracy, seed_everything, train

__all__ = ["Task", "TrialResult", "ConstraintViolation", "evaluate", "get_dataset", "PACKED_NAME"]

PACKED_NAME = "weights.nasp"
CALIBRATION_SAMPLES = 64


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
    teachers: int = 1
    teacher_epochs: int = 20
    max_memory_mb: float = 4096.0  # candidates estimated to need more to train fail in pre-flight
    reward: dict[str, Any] | None = None  # {"on": cost name, "target": T, "form": soft|hard}
    early_stop: dict[str, Any] | None = None  # RungRule fields; None turns early stopping off

    def rung_rule(self) -> RungRule | None:
        if self.early_stop is None:
            return None
        d = dict(self.early_stop)
        if "fractions" in d:
            d["fractions"] = tuple(d["fractions"])
        return RungRule(**d)

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


def _check_downsampling(arch: ArchConfig) -> None:
    """A stride applied to a feature map already 1 wide along that axis is an infeasible shape
    (e.g. four stride-2 stages on an 8x8 input): reject it before building anything."""
    h, w = arch.input_size
    for k, b in enumerate(arch.blocks):
        if b.stride > 1 and (w == 1 or (arch.spatial == "2d" and h == 1)):
            n = sum(1 for x in arch.blocks if x.stride > 1)
            raise TrialFailure(f"infeasible shape: block {k} (stage {b.stage}) downsamples a {h}x{w} feature map; "
                               f"an input of {arch.input_size[0]}x{arch.input_size[1]} cannot take {n} strided stages")
        if arch.spatial == "2d":
            h = (h - 1) // b.stride + 1
        w = (w - 1) // b.stride + 1


def training_memory_mb(model: nn.Module, example: torch.Tensor, batch_size: int) -> float:
    """Estimate of training memory: weights, gradients and two Adam moments, plus every layer's
    activations (kept for backward) at the training batch size."""
    acts = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal acts
        if isinstance(out, torch.Tensor):
            acts += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return (4 * params + 2 * acts * batch_size) * 4 / 2**20


def _check_shapes(arch: ArchConfig, data: Dataset) -> None:
    if arch.in_channels != data.in_channels or tuple(arch.input_size) != data.input_size:
        raise TrialFailure(
            f"candidate expects input {arch.in_channels}x{arch.input_size}, dataset {data.name} gives "
            f"{data.in_channels}x{data.input_size}"
        )
    if arch.num_classes != data.num_classes:
        raise TrialFailure(f"candidate has {arch.num_classes} classes, dataset {data.name} has {data.num_classes}")


def _costs(model: nn.Module, cand: Candidate, blob: bytes, example: torch.Tensor, calibration: torch.Tensor,
           workdir: Path, threads: int, exported: Exported) -> dict[str, Any]:
    """Every cost of the shipped form: deployable ONNX latency, packed-file bytes, FLOPs, params."""
    onnx_path, precision = deploy_onnx(model, cand.compression, example, workdir / "model.onnx", calibration,
                                       exported)
    lat = onnx_latency(onnx_path, tuple(example.shape), threads=threads)
    size = write_file(workdir / PACKED_NAME, blob)
    return {
        "latency_ms": lat.median_ms,
        "latency_iqr_ms": lat.iqr_ms,
        "latency_noisy": lat.noisy,
        "latency_attempts": lat.attempts,
        "latency_threads": lat.threads,
        **latency_host(),
        "size_bytes": size,
        "onnx_bytes": onnx_path.stat().st_size,
        "deploy_precision": precision,
        "flops": count_flops(model, example),
        "params": count_params(model),
    }


def _distill_loss(cand: Candidate, task: Task, data: Dataset) -> Callable | None:
    cfg = cand.compression
    if cfg.distill_alpha <= 0:
        return None
    # the study's own folder (never a shared temp folder other users could write into)
    folder = Path(task.artifacts_dir) / "teachers" if task.artifacts_dir else None
    teachers = get_teachers(folder, data, task.teachers, task.teacher_epochs)
    return distill_loss_fn(teachers, cfg.distill_alpha, cfg.distill_T)


def evaluate(
    candidate: Candidate,
    task: Task,
    *,
    trial_id: str | None = None,
    at_rung: Callable[[int, float, dict[str, Any]], None] | None = None,
) -> TrialResult:
    """Pre-flight costs, constraints, training, compression, accuracy of the shipped artifact.

    ``at_rung(epoch, val_accuracy, costs)`` is called at the early-stopping rungs of
    ``task.early_stop`` and may raise :class:`~nas.early_stop.EarlyStopped`.
    Raises :class:`ConstraintViolation` (reject without training) or :class:`TrialFailure`.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if task.train_threads:
        torch.set_num_threads(task.train_threads)
    data = get_dataset(task.dataset, task.seed)
    _check_shapes(candidate.arch, data)
    _check_downsampling(candidate.arch)
    example = torch.zeros(1, data.in_channels, *data.input_size)
    calibration = data.x_train[:CALIBRATION_SAMPLES]
    arch = dataclasses.replace(candidate.arch, share=candidate.compression.share)

    # 1. pre-flight: the final compressed shape with untrained weights gives every cost
    seed_everything(task.seed)
    try:
        preview = compress(build(arch), candidate, data, task.seed, finetune=False)
        with torch.no_grad():
            # untrained BatchNorms fold into bias-free convolutions, which the exporter's
            # optimizer drops; a trained model's never are: give the preview the same graph
            for bn in preview.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.bias.fill_(1e-3)
            preview.eval()(example)
        blob = pack_model(preview, candidate.compression)
        preview = load_packed(candidate, blob)  # time exactly the structure that will ship
    except (RuntimeError, ValueError) as exc:
        raise TrialFailure(f"infeasible candidate: {exc}") from exc
    exported = Exported(preview, example)
    with tempfile.TemporaryDirectory(prefix="nas-trial-") as tmp:
        costs = _costs(preview, candidate, blob, example, calibration, Path(tmp), task.latency_threads, exported)
    timings["preflight_s"] = time.perf_counter() - t0
    # Sizes that depend on trained values (Huffman streams, how many low-bit codes round to
    # zero behind a sparsity mask, codebook fill) are checked after compression instead.
    cfg = candidate.compression
    value_dependent = cfg.huffman or cfg.cluster_bits > 0 or (
        cfg.sparsity > 0 and any(p not in ("fp32", "fp16") for p in cfg.precisions))
    limits = {k: v for k, v in task.constraints.items() if not (k == "size_bytes" and value_dependent)}
    reason = check_constraints(costs, limits)
    if reason:
        raise ConstraintViolation(reason)

    # 2. train the full-width model (distillation / slimming penalty if the genes ask)
    t1 = time.perf_counter()
    seed_everything(task.seed)
    model = build(arch)
    mem = training_memory_mb(model, example, candidate.recipe.batch_size)
    if mem > task.max_memory_mb:
        raise TrialFailure(f"over the memory limit: training needs ~{mem:.0f} MB > max {task.max_memory_mb:.0f} MB")
    recipe = candidate.recipe if task.epochs is None else dataclasses.replace(candidate.recipe, epochs=task.epochs)
    loss_fn = _distill_loss(candidate, task, data)
    penalty = (lambda m: slimming_penalty(m, cfg.slimming_l1)) if cfg.prune == "bn" and cfg.slimming_l1 > 0 else None
    on_epoch: Callable[[int, nn.Module], None] | None = None
    rule = task.rung_rule()
    if rule is not None and at_rung is not None:
        rungs = set(rule.rungs(recipe.epochs))

        def check_rung(epoch: int, m: nn.Module) -> None:
            if epoch in rungs:
                at_rung(epoch, accuracy(m, data.x_val, data.y_val), costs)

        on_epoch = check_rung

    stats = train(model, data.x_train, data.y_train, recipe, task.seed, loss_fn=loss_fn, penalty=penalty,
                  on_epoch=on_epoch)
    timings["train_s"] = time.perf_counter() - t1

    # 3. compress (with fine-tuning), pack, and decode what would ship
    t2 = time.perf_counter()
    compressed = compress(model, candidate, data, task.seed, loss_fn=loss_fn)
    blob = pack_model(compressed, candidate.compression)
    shipped = load_packed(candidate, blob)
    timings["compress_s"] = time.perf_counter() - t2

    # 4. accuracy of the deployable artifact, in ONNX Runtime
    t3 = time.perf_counter()
    out = Path(task.artifacts_dir) / trial_id if task.artifacts_dir and trial_id is not None else None
    with tempfile.TemporaryDirectory(prefix="nas-ship-") as tmp:
        folder = out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        size = write_file(folder / PACKED_NAME, blob)
        onnx_path, precision = deploy_onnx(shipped, candidate.compression, example, folder / "model.onnx", calibration,
                                           exported)
        pred = onnx_predict(onnx_path, torch.cat([data.x_val, data.x_test])).argmax(1)  # one ORT session
        val_pred, test_pred = pred[: len(data.y_val)], pred[len(data.y_val) :]
        if out is not None:
            (folder / "candidate.json").write_text(candidate.to_json())
    val_acc = float((val_pred == data.y_val.numpy()).mean())
    test_acc = float((test_pred == data.y_test.numpy()).mean())
    # the packed model in PyTorch (float activations): differs from the deployed one only where
    # int8 QDQ quantizes activations; stored beside the deployed figures, never selected on
    packed_acc = accuracy(shipped, data.x_val, data.y_val)
    packed_test_acc = accuracy(shipped, data.x_test, data.y_test)
    timings["eval_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0

    costs["preflight_size_bytes"] = costs["size_bytes"]
    costs["onnx_graph_reused"] = exported.last_reused  # pre-flight graph re-weighted, not exported again
    costs["size_bytes"] = size
    reason = check_constraints(costs, task.constraints)
    if reason:
        raise ConstraintViolation(reason.replace("before training", "after compression"))
    objectives = {"accuracy": val_acc, **{k: float(costs[k]) for k in ("latency_ms", "size_bytes", "flops", "params")}}
    if task.reward:
        objectives["reward"] = mnasnet_reward(val_acc, objectives[task.reward["on"]], task.reward["target"],
                                              task.reward.get("form", "soft"))
    metrics = {
        **costs,
        "accuracy": val_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "packed_val_accuracy": packed_acc,
        "packed_test_accuracy": packed_test_acc,
        "epochs": stats.epochs,
        "final_loss": stats.final_loss,
        **timings,
    }
    if "reward" in objectives:
        metrics["reward"] = objectives["reward"]
    return TrialResult(objectives, metrics, str(out) if out else None)
