"""Costs measured on what ships: ONNX Runtime latency, bytes of a real file, fvcore FLOPs.

Latency is timed on the exported ONNX model in ONNX Runtime on CPU (batch 1, a fixed thread
count, warm-up, many repeats; median and IQR). Eager PyTorch timings of tiny models mostly
time Python, so they are never used. Only one process per host times at a time: the timing
loop holds a node-local file lock, so concurrent trials (``--jobs``, Ray workers) queue for
it instead of disturbing each other's figures.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

# re-exported: export and sessions moved to nas.onnxio, callers import them from here too
from nas.onnxio import (  # noqa: F401
    Exported,
    export_onnx,
    export_onnx_as,
    ort_predict,
    ort_session,
    quiet_exporter,
    quiet_output,
)
# re-exported: the timing core lives in nas.timing (no PyTorch: the probe server uses it too)
from nas.timing import (  # noqa: F401
    LATENCY_HOST_KEYS,
    NOISY_IQR_RATIO,
    WINDOW_GAP_S,
    WINDOWS,
    InputLatency,
    Latency,
    cpu_model,
    file_lock,
    identity_graph,
    latency_host,
    measure_lock,
    onnx_latency,
    onnx_latency_over,
)

__all__ = [
    "Latency",
    "InputLatency",
    "onnx_latency_over",
    "count_params",
    "count_flops",
    "export_onnx",
    "export_onnx_as",
    "Exported",
    "onnx_latency",
    "latency_host",
    "cpu_model",
    "measure_lock",
    "NOISY_IQR_RATIO",
]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flop_analysis(model: nn.Module, example: torch.Tensor, per_module: bool) -> Any:
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, example)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return {k: int(v) for k, v in analysis.by_module().items()} if per_module else int(analysis.total())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs as fvcore counts them (one per multiply-add), for one input of ``example``'s shape."""
    return _flop_analysis(model, example, per_module=False)


def flops_by_module(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """fvcore FLOPs of every submodule, by qualified name ("" is the whole model)."""
    return _flop_analysis(model, example, per_module=True)


