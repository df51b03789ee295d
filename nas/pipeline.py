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

import collections
import dataclasses
import functools
import threading
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.compress.pack import write_file
from nas.compress.deploy import deploy_onnx, onnx_predict
from nas.compress.passes import (
    compress,
    dynamic_latency,
    load_packed,
    method_metrics,
    pack_model,
    trained_arch,
    trained_model,
    training_terms,
    value_dependent_size,
)
from nas.config import ArchConfig, Candidate, Recipe, augments_for
from nas.data import Dataset, load_dataset
from nas.device import on_device
from nas.task import Task, auto_screen, default_train_threads  # noqa: F401 - re-exported
from nas.errors import TrialFailure
from nas.measure import (
    count_flops,
    count_params,
    latency_host,
    onnx_latency,
    onnx_latency_over,
)
from nas.objectives import check_constraints, mnasnet_reward
from nas.train import TrainStats, accuracy, seed_everything, train

__all__ = ["Task", "TrialResult", "ConstraintViolation", "evaluate", "get_dataset", "reference_floor", "timed",
           "PACKED_NAME", "artifact_name"]

PACKED_NAME = "weights.nasp"
CALIBRATION_SAMPLES = 64


class ConstraintViolation(TrialFailure):
    """A hard constraint failed in pre-flight: the trial is pruned, not trained. ``costs``: the
    measured costs (recorded with the trial: a sampler learns where the limits bite)."""

    def __init__(self, message: str, costs: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.costs = dict(costs or {})


@dataclass
class TrialResult:
    objectives: dict[str, float]
    metrics: dict[str, Any]
    artifact_dir: str | None = None


def artifact_name(number: int) -> str:
    """The folder a trial's artifacts go in, under the study's artifacts directory."""
    return f"trial-{number:05d}"


def get_dataset(name: str, seed: int) -> Dataset:
    """Load once per process; every trial of a study reuses the same tensors. Data files that
    changed on disk since (size or modification time of the file, or of any file under a
    dataset folder) are loaded again."""
    return _cached_dataset(name, seed, _stamp(name))


@functools.lru_cache(maxsize=8)
def _cached_dataset(name: str, seed: int, _stamp: tuple) -> Dataset:
    return load_dataset(name, seed)


def _stamp(name: str) -> tuple:
    import os

    path = Path(name.split("?", 1)[0])
    try:
        if path.is_file():
            st = path.stat()
            return (st.st_size, st.st_mtime_ns)
        if path.is_dir():
            out = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    out.append((f, st.st_size, st.st_mtime_ns))
            return tuple(out)
    except OSError:
        pass
    return ()


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


def _check_shapes(arch: ArchConfig, data: Dataset, recipe: Recipe | None = None) -> None:
    if arch.in_channels != data.in_channels or tuple(arch.input_size) != data.input_size:
        raise TrialFailure(
            f"candidate expects input {arch.in_channels}x{arch.input_size}, dataset {data.name} gives "
            f"{data.in_channels}x{data.input_size}"
        )
    if arch.num_classes != data.num_classes:
        raise TrialFailure(f"candidate has {arch.num_classes} classes, dataset {data.name} has {data.num_classes}")
    if recipe is not None and recipe.augment not in augments_for(data.spatial):
        raise TrialFailure(f"augment {recipe.augment!r} rotates and scales 2-D inputs; this dataset is 1-D "
                           f"(use {' or '.join(repr(a) for a in augments_for(data.spatial))})")


def reference_floor(task: Task) -> float:
    """The runtime's floor on this host now: an Identity graph's latency for the task's input."""
    from nas.measure import identity_graph

    data = get_dataset(task.dataset, task.seed)
    return onnx_latency(identity_graph((1, data.in_channels, *data.input_size)), (1, data.in_channels,
                        *data.input_size), threads=task.latency_threads).median_ms


def timed(path: Path, example: torch.Tensor, task: Task, inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Latency of an ONNX file, scaled to the study's reference host speed.

    Load on a shared host comes in phases that slow every run alike (raw timings of one model
    moved by 70% between moments here while its ratio to the runtime floor held within 7%), so
    the figure is the raw median times (reference floor / floor timed in the same windows):
    trials timed at different moments stay comparable. The raw median and both floors are kept.

    ``inputs``: a graph whose work depends on its input (early exits) is timed over these
    (the validation split) at batch 1: ``latency_ms`` is their mean, ``latency_p95_ms`` beside.

    With ``task.latency_on`` the model is timed on that probe (the target device) with the same
    protocol; the figure is the device's own (no host scaling) and the device's identity is
    returned with it (``latency_cpu``, ``latency_cores``, ``latency_onnxruntime``, ``latency_device``)."""
    if task.latency_model:
        return _timed_by_model(path, task, inputs)
    if task.latency_on:
        return _timed_on_probe(path, task, inputs)
    if inputs is not None:  # work depends on the input: mean over the inputs at batch 1, p95 beside
        over = onnx_latency_over(path, inputs.numpy(), threads=task.latency_threads)
        ref = task.latency_floor_ms if task.latency_floor_ms and over.floor_ms > 0 else None
        scale = ref / over.floor_ms if ref else 1.0
        return {"latency_ms": over.mean_ms * scale, "latency_iqr_ms": over.iqr_ms * scale,
                "latency_p95_ms": over.p95_ms * scale, "latency_raw_ms": over.mean_ms,
                "latency_floor_now_ms": over.floor_ms, "latency_floor_ms": ref or over.floor_ms,
                "latency_noisy": over.noisy, "latency_attempts": 1, "latency_threads": over.threads,
                "latency_inputs": over.inputs}
    lat = onnx_latency(path, tuple(example.shape), threads=task.latency_threads)
    ref = task.latency_floor_ms if task.latency_floor_ms and lat.floor_ms > 0 else None
    scale = ref / lat.floor_ms if ref else 1.0
    return {"latency_ms": lat.median_ms * scale, "latency_iqr_ms": lat.iqr_ms * scale,
            "latency_raw_ms": lat.median_ms, "latency_floor_now_ms": lat.floor_ms,
            "latency_floor_ms": ref or lat.floor_ms, "latency_noisy": lat.noisy, "latency_attempts": lat.attempts,
            "latency_threads": lat.threads, "latency_lock_wait_s": lat.lock_wait_s}


def _timed_by_model(path: Path, task: Task, inputs: torch.Tensor | None) -> dict[str, Any]:
    """``--latency-model``: the device's latency predicted from the graph (nas.latency_model)."""
    from nas.latency_model import graph_features, load_latency_model

    if inputs is not None:
        raise TrialFailure("input-dependent latency (early exits) is not predicted; --latency-model predicts "
                           "single-input figures")
    model, device = load_latency_model(task.latency_model)
    ms = float(model.predict(graph_features(path)))
    out = {"latency_ms": ms, "latency_iqr_ms": 0.0, "latency_raw_ms": ms, "latency_noisy": False,
           "latency_attempts": 0, "latency_source": "predicted", "latency_device": f"model {Path(task.latency_model).name}"}
    out.update({k: device[k] for k in ("latency_cpu", "latency_cores", "latency_onnxruntime") if k in device})
    if "threads" in device:
        out["latency_threads"] = device["threads"]
    return out


_PROBES: dict[tuple[str, str], Any] = {}


def _timed_on_probe(path: Path, task: Task, inputs: torch.Tensor | None) -> dict[str, Any]:
    from nas.errors import NasError
    from nas.probe import ProbeClient, connect

    if inputs is not None:
        raise TrialFailure("input-dependent latency (early exits) is timed on this host only; --latency-on "
                           "times single-input figures")
    key = (task.latency_on, task.probe_token_file)
    try:
        if key not in _PROBES:
            _PROBES[key] = connect(task.latency_on, task.probe_token_file)
        answer = _PROBES[key].time(path)  # retried with backoff while the probe is down, then one line
        lat, dev = answer["latency"], answer["device"]
        median, iqr, floor = (float(lat[k]) for k in ("median_ms", "iqr_ms", "floor_ms"))
        out = {"latency_ms": median, "latency_iqr_ms": iqr, "latency_raw_ms": median, "latency_floor_now_ms": floor,
               "latency_floor_ms": floor, "latency_noisy": bool(lat["noisy"]), "latency_attempts": int(lat["attempts"]),
               "latency_threads": int(lat["threads"]), "latency_lock_wait_s": float(lat.get("lock_wait_s", 0.0)),
               "latency_device": ProbeClient.redacted(task.latency_on)}
        out.update({k: dev[k] for k in ("latency_cpu", "latency_cores", "latency_onnxruntime")})
    except NasError as exc:  # the trial fails with the reason; the search goes on, resume retries it
        raise TrialFailure(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise TrialFailure(f"probe {task.latency_on}: a malformed answer ({type(exc).__name__}: {exc})") from None
    return out


def _costs(model: nn.Module, cand: Candidate, blob: bytes, example: torch.Tensor, calibration: torch.Tensor,
           workdir: Path, task: Task, normalize: tuple[float, float]) -> dict[str, Any]:
    """Every cost of the shipped form: deployable ONNX latency (the graph normalises its raw
    input first, as shipped), packed-file bytes, FLOPs, params."""
    onnx_path, precision, _ = deploy_onnx(model, cand.compression, example, workdir / "model.onnx", calibration,
                                          normalize=normalize)
    lat = timed(onnx_path, example, task)
    size = write_file(workdir / PACKED_NAME, blob)
    return {
        **latency_host(),
        **lat,  # a probe's device identity replaces this host's
        "size_bytes": size,
        "onnx_bytes": onnx_path.stat().st_size,
        "deploy_precision": precision,
        "flops": count_flops(model, example),
        "params": count_params(model),
    }


@dataclass
class _Trial:
    """What the steps of one evaluation hand each other."""

    candidate: Candidate
    task: Task
    data: Dataset
    example: torch.Tensor
    calibration: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    inherit: Callable | None = None  # (arch, data) -> a network with inherited weights (nas.strategy)
    number: int | None = None  # the study's trial number, where there is one
    trained_by: int | None = None  # the trial whose trained weights this one reused (siblings)


def preview_model(candidate: Candidate, data: Dataset, seed: int, example: torch.Tensor) -> tuple[nn.Module, bytes]:
    """The candidate in its final compressed shape with untrained weights, as it will ship
    (packed and loaded back), and its packed bytes: what pre-flight times and sizes."""
    seed_everything(seed)
    try:
        preview = compress(trained_model(candidate), candidate, data, seed, finetune=False)
        with torch.no_grad():
            # untrained BatchNorms fold into bias-free convolutions, which the exporter's
            # optimizer drops; a trained model's never are: give the preview the same graph.
            # The biases must also differ from each other: equal folded biases are stored once
            # and read through Identity nodes, behind which the int8 quantizer no longer sees
            # a constant and left convolutions in float (the preview timed a graph that never ships)
            for bn in preview.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.bias.copy_(1e-3 * (1 + torch.rand_like(bn.bias)))
            preview.eval()(example)
        blob = pack_model(preview, candidate.compression)
        return load_packed(candidate, blob), blob  # time exactly the structure that will ship
    except (RuntimeError, ValueError) as exc:
        raise TrialFailure(f"infeasible candidate: {exc}") from exc


def _preflight(t: _Trial) -> dict[str, Any]:
    """The final compressed shape with untrained weights gives every cost; a violated hard
    limit rejects the candidate before training (sizes that depend on trained values are
    checked after compression instead)."""
    preview, blob = preview_model(t.candidate, t.data, t.task.seed, t.example)
    with tempfile.TemporaryDirectory(prefix="nas-trial-") as tmp:
        costs = _costs(preview, t.candidate, blob, t.example, t.calibration, Path(tmp), t.task, t.data.normalization)
    # sizes that depend on trained values, and latencies that depend on the input (early exits:
    # the untrained pre-flight graph runs to full depth, an upper bound), are checked after compression
    later = {"size_bytes"} if value_dependent_size(t.candidate.compression) else set()
    later |= {"latency_ms"} if dynamic_latency(t.candidate.compression) else set()
    reason = check_constraints(costs, {k: v for k, v in t.task.constraints.items() if k not in later})
    if reason:
        raise ConstraintViolation(reason, costs)
    return costs


# Trained weights by what determines them (nas.siblings): a trial whose architecture, recipe and
# training-time genes equal an earlier trial's in this process starts from that trial's trained
# weights instead of training again. Training is seeded, so this is a cache: it changes the
# cost, not the result. Kept in memory (a few small models; nothing is written or read back).
TRAINED_CACHE_SIZE = 4
_TRAINED: collections.OrderedDict[str, tuple[dict[str, torch.Tensor], TrainStats, int | None]] = collections.OrderedDict()
_TRAINED_LOCK = threading.Lock()


def training_key(cand: Candidate, task: Task, recipe: Recipe) -> str:
    """What the trained weights of ``cand`` depend on: the trained architecture, the recipe,
    the genes of every active method that acts during training (a loss, a penalty, added
    modules, a changed architecture), the data and seed, and where it trains. Post-training
    genes (pruning, quantization, clustering, Huffman coding...) are left out: candidates that
    differ only in them train the same weights."""
    from nas.compress.passes import active_methods
    from nas.compress.registry import Method

    during = []
    for m in active_methods(cand.compression):
        cls = type(m)  # (a training loss is not built here: distillation's trains its teachers)
        if (cls.loss is not Method.loss or m.penalty(cand.compression) is not None
                or cls.extend is not Method.extend or cls.build_arch is not Method.build_arch):
            during.append((m.name, repr(cand.compression[m.config])))
    return repr((trained_arch(cand), recipe, sorted(during), task.dataset, task.seed, task.device, task.amp))


def screen_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The fixed subset every trial of a study is screened on (seeded: the same for all)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    return torch.randperm(n, generator=g)[: max(1, int(round(n * fraction)))]


def _train(t: _Trial, costs: dict[str, Any], at_rung: Callable | None,
           progress: Callable[[str], None] | None = None) -> tuple[nn.Module, Any, Callable | None]:
    """Train the full-width model, with the methods' loss (distillation) and penalty
    (slimming); rung checks report validation accuracy and may stop the trial. With a screen
    fraction, a model trained on that fraction of the data is judged at rung 0 first."""
    seed_everything(t.task.seed)
    model = trained_model(t.candidate)
    if t.inherit is not None:  # --strategy supernet: the weights come from the study's supernet
        t0 = time.perf_counter()
        # modules the methods add for training (exit heads) keep their initial weights
        model.load_state_dict(t.inherit(trained_arch(t.candidate), t.data).state_dict(), strict=False)
        t.timings.update(supernet_s=getattr(t.inherit, "supernet_s", 0.0), epoch_s_estimate=getattr(t.inherit, "epoch_s", 0.0))
        loss_fn, _ = training_terms(t.candidate.compression, t.task, t.data)
        return model.eval(), TrainStats(0, float("nan"), time.perf_counter() - t0), loss_fn
    mem = training_memory_mb(model, t.example, t.candidate.recipe.batch_size)
    if mem > t.task.max_memory_mb:
        raise TrialFailure(f"over the memory limit: training needs ~{mem:.0f} MB > max {t.task.max_memory_mb:.0f} MB")
    recipe = t.candidate.recipe if t.task.epochs is None else dataclasses.replace(t.candidate.recipe, epochs=t.task.epochs)
    loss_fn, penalty = training_terms(t.candidate.compression, t.task, t.data)
    key = training_key(t.candidate, t.task, recipe) if t.task.siblings else None
    with _TRAINED_LOCK:
        hit = _TRAINED.get(key) if key is not None else None
        if hit is not None:
            _TRAINED.move_to_end(key)
    if hit is not None:  # the same training as an earlier trial's (a sibling): its weights, no screen, no rungs
        state, stats, number = hit
        model.load_state_dict(state)
        t.timings.update(cached_train_s=stats.seconds)
        t.trained_by = number
        return model, stats, loss_fn
    rule = t.task.rung_rule()
    rungs = set(rule.rungs(recipe.epochs)) if rule is not None and at_rung is not None else set()
    decided_off = getattr(at_rung, "decided_off", None)
    off = decided_off(0) if decided_off is not None and rule is not None and t.task.screen > 0 else None
    if off:  # the screen's calibration is done and it stops nothing: do not pay for it
        t.timings.update(screen_s=0.0, screen_skipped=1.0)
    elif rule is not None and at_rung is not None and t.task.screen > 0:
        t0 = time.perf_counter()
        idx = screen_indices(len(t.data.y_train), t.task.screen, t.task.seed)
        screened = trained_model(t.candidate)

        def screen_epoch(epoch: int, _m: nn.Module) -> None:
            if progress is not None:
                progress(f"screen {epoch}/{recipe.epochs}")

        train(screened, t.data.x_train[idx], t.data.y_train[idx], recipe, t.task.seed, loss_fn=loss_fn,
              penalty=penalty, on_epoch=screen_epoch)
        t.timings["screen_s"] = time.perf_counter() - t0
        at_rung(0, accuracy(screened, t.data.x_val, t.data.y_val), costs)  # may stop the trial here
        del screened

    def on_epoch(epoch: int, m: nn.Module) -> None:
        if progress is not None:
            progress(f"epoch {epoch}/{recipe.epochs}" + (" (rung)" if epoch in rungs else ""))
        if epoch in rungs:
            at_rung(epoch, accuracy(m, t.data.x_val, t.data.y_val), costs)

    stats = train(model, t.data.x_train, t.data.y_train, recipe, t.task.seed, loss_fn=loss_fn, penalty=penalty,
                  on_epoch=on_epoch if rungs or progress is not None else None)
    if key is not None:
        with _TRAINED_LOCK:
            _TRAINED[key] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, stats, t.number)
            while len(_TRAINED) > TRAINED_CACHE_SIZE:
                _TRAINED.popitem(last=False)
    return model, stats, loss_fn


def _deploy_and_score(t: _Trial, shipped: nn.Module, blob: bytes, out: Path | None) -> dict[str, Any]:
    """Write the packed file and the deployable ONNX model; accuracy of that artifact in ONNX
    Runtime on the raw validation (the objective) and test (reported) inputs, which it normalises
    itself, and of the packed model beside it."""
    data = t.data
    with tempfile.TemporaryDirectory(prefix="nas-ship-") as tmp:
        folder = out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        size = write_file(folder / PACKED_NAME, blob)
        onnx_path, _, exporter = deploy_onnx(shipped, t.candidate.compression, t.example, folder / "model.onnx",
                                             t.calibration, normalize=data.normalization)
        pred = onnx_predict(onnx_path, torch.cat([data.raw("val"), data.raw("test")])).argmax(1)  # one ORT session
        dynamic = dynamic_latency(t.candidate.compression)
        lat = timed(onnx_path, t.example, t.task, inputs=data.raw("val") if dynamic else None)
        if out is not None:
            (folder / "candidate.json").write_text(t.candidate.to_json())
    val_pred, test_pred = pred[: len(data.y_val)], pred[len(data.y_val) :]
    # the packed model in PyTorch (float activations): differs from the deployed one only where
    # int8 QDQ quantizes activations; stored beside the deployed figures, never selected on
    return {"size_bytes": size, "onnx_exporter": exporter, **{f"deployed_{k}": v for k, v in lat.items()},
            "accuracy": float((val_pred == data.y_val.numpy()).mean()),
            "test_accuracy": float((test_pred == data.y_test.numpy()).mean()),
            "packed_val_accuracy": accuracy(shipped, data.x_val, data.y_val),
            "packed_test_accuracy": accuracy(shipped, data.x_test, data.y_test),
            **method_metrics(shipped, t.candidate.compression, data)}


def _result(t: _Trial, costs: dict[str, Any], scores: dict[str, Any], stats: Any, out: Path | None) -> TrialResult:
    costs = {**costs, "preflight_size_bytes": costs["size_bytes"], "size_bytes": scores["size_bytes"],
             "preflight_latency_ms": costs["latency_ms"]}
    # The shipped artifact is timed again (same structure as the pre-flight graph, moments
    # later). Load on the host only ever slows a timing down, and here it comes in phases of
    # seconds (a 2x slowdown was seen): the faster of the two is the better estimate.
    # A graph whose latency depends on its input is only ever timed right after training: the
    # pre-flight timed it untrained, running to full depth.
    # A predicted figure (--latency-model) has no timing noise: the shipped graph's prediction
    # is the figure, whatever the untrained pre-flight graph predicted.
    predicted = scores.get("deployed_latency_source") == "predicted"
    if predicted or scores["deployed_latency_ms"] < costs["latency_ms"] or dynamic_latency(t.candidate.compression):
        costs.pop("latency_p95_ms", None)
        costs.update({k.removeprefix("deployed_"): v for k, v in scores.items() if k.startswith("deployed_")})
    reason = check_constraints(costs, t.task.constraints)
    if reason:
        raise ConstraintViolation(reason.replace("before training", "after compression"), costs)
    acc = scores["accuracy"]
    objectives = {"accuracy": acc, **{k: float(costs[k]) for k in ("latency_ms", "size_bytes", "flops", "params")}}
    if t.task.reward:
        r = t.task.reward
        objectives["reward"] = mnasnet_reward(acc, objectives[r.on], r.target, r.form)
    metrics = {**costs, **{k: v for k, v in scores.items() if not k.startswith("deployed_")}, "val_accuracy": acc, "epochs": stats.epochs, "final_loss": stats.final_loss,
               **t.timings, **({"reward": objectives["reward"]} if "reward" in objectives else {}),
               **({"trained_by": t.trained_by} if t.trained_by is not None else {})}
    return TrialResult(objectives, metrics, str(out) if out else None)


def evaluate(
    candidate: Candidate,
    task: Task,
    *,
    trial_id: str | None = None,
    at_rung: Callable[[int, float, dict[str, Any]], None] | None = None,
    progress: Callable[[str], None] | None = None,
    inherit: Callable | None = None,
    number: int | None = None,
) -> TrialResult:
    """Pre-flight costs, constraints, training, compression, accuracy of the shipped artifact.
    ``inherit(arch, data)``: weights from a supernet instead of training (``--strategy supernet``).

    ``at_rung(epoch, val_accuracy, costs)`` is called at the early-stopping rungs of
    ``task.early_stop`` and may raise :class:`~nas.early_stop.EarlyStopped` (rung 0: the
    data-fraction screen, ``task.screen``; skipped where ``at_rung.decided_off(0)`` says so). ``progress(text)`` hears where training is
    ("epoch 3/12", "screen 2/12"), for live displays. With ``task.siblings``, trained weights are
    kept by :func:`training_key` and reused by a later candidate that trains the same (``number``,
    the study's trial number, is recorded as its ``trained_by``).
    Raises :class:`ConstraintViolation` (reject without training) or :class:`TrialFailure`.
    """
    clock = time.perf_counter
    t0 = clock()
    if task.train_threads:
        torch.set_num_threads(task.train_threads)
    data = get_dataset(task.dataset, task.seed)
    _check_shapes(candidate.arch, data, candidate.recipe)
    _check_downsampling(candidate.arch)
    t = _Trial(candidate, task, data, torch.zeros(1, data.in_channels, *data.input_size),
               data.x_train[:CALIBRATION_SAMPLES], inherit=inherit, number=number)
    out = Path(task.artifacts_dir) / trial_id if task.artifacts_dir and trial_id is not None else None
    with on_device(task.device, task.amp):  # where everything of this trial that trains runs (nas.device)
        return _run(t, candidate, task, out, at_rung, progress, t0)


def _run(t: _Trial, candidate: Candidate, task: Task, out: Path | None, at_rung: Callable | None,
         progress: Callable[[str], None] | None, t0: float) -> TrialResult:
    clock, data = time.perf_counter, t.data
    costs = _preflight(t)  # 1. every cost, on the final shape; reject over a limit
    t.timings["preflight_s"] = (t1 := clock()) - t0
    model, stats, loss_fn = _train(t, costs, at_rung, progress)  # 2. train (rungs may stop it)
    t.timings["train_s"] = (t2 := clock()) - t1
    compressed = compress(model, candidate, data, task.seed, loss_fn=loss_fn, max_epochs=task.epochs)  # 3. compress
    blob = pack_model(compressed, candidate.compression)
    shipped = load_packed(candidate, blob)
    t.timings["compress_s"] = (t3 := clock()) - t2
    scores = _deploy_and_score(t, shipped, blob, out)  # 4. deploy and score the artifact
    t.timings["eval_s"] = clock() - t3
    t.timings["total_s"] = clock() - t0
    return _result(t, costs, scores, stats, out)  # 5. objectives and metrics
