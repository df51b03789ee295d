"""``nas probe profile``: time a sample of a space's deployable graphs for a device's latency
model (:mod:`nas.latency_model`, which reads the profile without PyTorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.latency_model import METHOD, VERSION, graph_features

__all__ = ["profile_space"]


def profile_space(space: Any, dataset: str, samples: int, *, seed: int = 0, timer: Any = None,
                  device: dict[str, Any] | None = None, threads: int = 1,
                  progress: Any = None) -> dict[str, Any]:
    """Time ``samples`` random deployable graphs of ``space`` (for ``dataset``'s input): the
    pre-flight form a trial times, untrained weights in the final compressed shape. ``timer(path)``
    returns the latency in ms (default: this host, ``threads``). Candidates whose latency depends
    on the input (early exits) and infeasible ones are skipped."""
    import tempfile

    import optuna
    import torch

    from nas.compress.deploy import deploy_onnx
    from nas.errors import TrialFailure
    from nas.compress.passes import dynamic_latency
    from nas.pipeline import CALIBRATION_SAMPLES, get_dataset, preview_model
    from nas.timing import latency_host, onnx_latency

    data = get_dataset(dataset, seed)
    example = torch.zeros(1, data.in_channels, *data.input_size)
    calibration = data.x_train[:CALIBRATION_SAMPLES]
    if timer is None:
        def timer(path: Path) -> float:
            return onnx_latency(path, tuple(example.shape), threads=threads).median_ms
        device = {**latency_host(), "threads": threads}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows: list[dict[str, Any]] = []
    tries = 0
    with tempfile.TemporaryDirectory(prefix="nas-profile-") as tmp:
        while len(rows) < samples and tries < samples * 5:
            tries += 1
            cand = space.suggest(study.ask(), in_channels=data.in_channels, input_size=data.input_size,
                                 num_classes=data.num_classes)
            if dynamic_latency(cand.compression):
                continue
            try:
                preview, _ = preview_model(cand, data, seed, example)
                path, precision, _ = deploy_onnx(preview, cand.compression, example, Path(tmp) / "model.onnx",
                                                 calibration, normalize=data.normalization)
            except TrialFailure:
                continue
            feats = graph_features(path)
            rows.append({"features": feats, "latency_ms": float(timer(path)), "deploy_precision": precision,
                         "summary": cand.arch.summary()})
            if progress is not None:
                progress(len(rows), samples)
    return {"version": VERSION, "device": device or {}, "method": METHOD, "space": space.name,
            "dataset": data.name, "samples": rows}
