"""``--strategy supernet``: trials inherit their weights from one weight-sharing supernet,
trained once per study, instead of training from scratch (issue 25, in progress).

The supernet (:mod:`nas.supernet`) is trained the first time a trial of the study needs it and
stored in the study's artifacts folder as ``supernet.safetensors`` (no pickle) beside
``supernet.json``, which records a key: a digest of the space's fingerprint, the data's content
fingerprint and split seed, and the supernet recipe. Every later trial, a resumed search, other
worker processes and Ray workers on the host load it; the first to need it trains it under a
file lock while the others wait on that lock. A stored supernet whose key differs (another
space, dataset or recipe in the same folder) is refused in one line, never silently used.

A trial under this strategy: the candidate's network extracted with its inherited weights
(the same module structure scratch training builds), its BatchNorm statistics re-estimated on
:data:`RECALIBRATION_SAMPLES` training images, then compression, deployment, measurement and
scoring exactly as for a scratch trial (the candidate's recipe genes do not apply: nothing is
trained but what compression fine-tunes).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.config import ArchConfig
from nas.errors import ConfigError

__all__ = ["STRATEGIES", "RECALIBRATION_SAMPLES", "supernet_key", "load_or_train_supernet", "inheritor"]

STRATEGIES = ("scratch", "supernet")
RECALIBRATION_SAMPLES = 2048
_LOADED: dict[tuple[str, str], Any] = {}  # (folder, key) -> SuperNet, per process


def _recipe(task: Any) -> dict[str, Any]:
    rec = {"epochs": int(task.supernet_epochs), "lr": 0.05, "batch_size": 128, "randoms": 2, "version": 1}
    sandwich = getattr(task, "supernet_sandwich", "fixed")
    if sandwich != "fixed":  # (absent for "fixed": supernets stored before the option keep their key)
        rec["sandwich"] = sandwich
    return rec


def supernet_key(space: Any, data: Any, task: Any) -> str:
    """What a stored supernet was trained for: space, data (content and split) and recipe."""
    text = json.dumps({"space": space.fingerprint(), "data": data.fingerprint, "seed": data.seed,
                       "recipe": _recipe(task)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_or_train_supernet(space: Any, data: Any, task: Any,
                           on_epoch: Callable[[int, float], None] | None = None) -> Any:
    """The study's supernet: loaded from its artifacts folder, or trained there first."""
    from safetensors.torch import load_file, save_file

    from nas.measure import file_lock
    from nas.supernet import SuperNet, train_supernet

    if not task.artifacts_dir:
        raise ConfigError("--strategy supernet needs an artifacts folder (--artifacts) to keep the supernet in")
    folder = Path(task.artifacts_dir)
    key = supernet_key(space, data, task)
    meta_path, weights = folder / "supernet.json", folder / "supernet.safetensors"

    def stored_key() -> str | None:
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta_path}: unreadable supernet record ({exc}); remove it to train again") from None
        if meta.get("key") != key:
            raise ConfigError(
                f"{folder}: holds a supernet for space {meta.get('space')!r} on data {str(meta.get('data', '?'))[:12]} "
                f"(key {meta.get('key')}); this study's space {space.name!r} on data {data.fingerprint[:12]} needs "
                f"key {key}: use another --artifacts folder or --study")
        return key

    cached = _LOADED.get((str(folder), key))
    if cached is not None and stored_key() == key:  # (the record is read again: it may have been replaced)
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    net = SuperNet(space, data.in_channels, data.input_size, data.num_classes)
    with file_lock(folder / "supernet.lock"):  # the first worker trains; the others wait here, then load
        if stored_key() is not None:
            net.load_state_dict(load_file(str(weights)))
        else:
            rec = _recipe(task)
            t0 = time.perf_counter()
            stats = train_supernet(net, data.x_train, data.y_train, epochs=rec["epochs"], lr=rec["lr"],
                                   batch_size=rec["batch_size"], randoms=rec["randoms"], seed=task.seed,
                                   sandwich=rec.get("sandwich", "fixed"),
                                   on_epoch=on_epoch)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
            meta_path.write_text(json.dumps({"key": key, "space": space.name, "data": data.fingerprint,
                                             "recipe": rec, "train_s": time.perf_counter() - t0,
                                             "steps": stats.steps, "final_loss": stats.final_loss}, indent=2))
    meta = json.loads(meta_path.read_text())
    rec = meta.get("recipe", {})
    # seconds per epoch of one candidate, at most: the supernet trained 2 + randoms of them per step
    net.epoch_s = float(meta.get("train_s", 0.0)) / max(1, int(rec.get("epochs", 1))) / (2 + int(rec.get("randoms", 2)))
    net.eval()
    _LOADED[(str(folder), key)] = net
    return net


def inheritor(space: Any, task: Any) -> Callable[[ArchConfig, Any], nn.Module]:
    """For :func:`nas.pipeline.evaluate` (``inherit=``): a candidate's network with weights
    inherited from the study's supernet, BatchNorm recalibrated on training images."""
    from nas.supernet import recalibrate_bn

    def inherit(arch: ArchConfig, data: Any) -> nn.Module:
        t0 = time.perf_counter()
        fresh = (str(task.artifacts_dir), supernet_key(space, data, task)) not in _LOADED
        net = load_or_train_supernet(space, data, task)
        inherit.epoch_s = net.epoch_s  # type: ignore[attr-defined] - read by the pipeline (finalists' estimate)
        inherit.supernet_s = time.perf_counter() - t0 if fresh else 0.0  # type: ignore[attr-defined]
        model = net.extract(arch)
        g = torch.Generator().manual_seed(task.seed)
        idx = torch.randperm(len(data.y_train), generator=g)[:RECALIBRATION_SAMPLES]
        return recalibrate_bn(model, data.x_train[idx]).eval()

    return inherit
