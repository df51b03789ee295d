"""Where training runs: ``--device auto|cpu|cuda|cuda:N|mps`` and ``--amp``.

Everything that trains (a trial's training and screen, fine-tuning, QAT, distillation teachers,
calibration passes) runs on the device of the trial it belongs to: :func:`evaluate` enters
:func:`on_device` for the whole trial and :func:`nas.train.train` reads it (a context variable:
concurrent trials in threads each keep their own). Latency is still timed on the deploy runtime
(ONNX Runtime on the CPU) and every artifact is written from CPU weights.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nas.errors import ConfigError

__all__ = ["Placement", "resolve_device", "on_device", "placement", "autocast_dtype"]

ALLOWED = "auto, cpu, cuda, cuda:N, mps"


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"
    amp: bool = False


_CURRENT: contextvars.ContextVar[Placement] = contextvars.ContextVar("nas_placement", default=Placement())


def resolve_device(spec: str) -> str:
    """``auto``: CUDA where there is one, else MPS, else the CPU. A device this host does not
    have is a :class:`ConfigError` naming what it has."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: this host has no MPS device (Apple GPUs only); allowed here: auto, cpu")
        return "mps"
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec[5:]
        if spec != "cuda" and not index.isdigit():
            raise ConfigError(f"--device {spec!r} is not allowed (allowed: {ALLOWED})")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: this host has no CUDA device (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); allowed here: auto, cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this host has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return spec
    raise ConfigError(f"--device {spec!r} is not allowed (allowed: {ALLOWED})")


@contextlib.contextmanager
def on_device(device: str = "cpu", amp: bool = False) -> Iterator[Placement]:
    """Train on ``device`` (resolved) with autocast if ``amp``, for the code inside."""
    token = _CURRENT.set(Placement(resolve_device(device), bool(amp)))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def placement() -> Placement:
    return _CURRENT.get()


def autocast_dtype(device: str) -> torch.dtype:
    """bfloat16 where the device computes it (CPUs, MPS, CUDA from Ampere on), else float16
    (which then trains with a gradient scaler)."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
