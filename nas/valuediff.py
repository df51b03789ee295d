"""Are two ONNX values the same? Tensors, sparse tensors and types, compared without loading
external data (a tensor pointing outside its file is a difference, never followed); floats
within :data:`REL_TOL` relative, element by element, everything else exactly. Used by
:mod:`nas.graphcheck`."""

from __future__ import annotations

from typing import Any

import numpy as np

from nas.trust import is_external

__all__ = ["REL_TOL", "floats_differ", "tensor_diff", "sparse_diff", "value_diff", "type_sig"]


# Float rounding allowed between a value and its reference (relative, element by element).
REL_TOL = 1e-6


def _float_types() -> set[int]:
    from onnx import TensorProto

    return {getattr(TensorProto, n) for n in ("FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                                               "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "FLOAT8E8M0")
            if hasattr(TensorProto, n)}


def floats_differ(a: np.ndarray, b: np.ndarray) -> str | None:
    a, b = np.asarray(a).astype(np.float64).ravel(), np.asarray(b).astype(np.float64).ravel()
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(a - b) <= REL_TOL * np.maximum(np.abs(a), np.abs(b))
        bad = (nan_a != nan_b) | (~nan_a & ~nan_b & ~(a == b) & ~close)
    if not bad.any():
        return None
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        rel = np.abs(a - b)[bad] / np.maximum(np.abs(a), np.abs(b))[bad]
    worst = float(np.nanmax(rel)) if np.isfinite(rel).any() else float("inf")
    return f"values differ at {int(bad.sum()):,} of {a.size:,} elements (largest relative difference {worst:.3g})"


def tensor_diff(a: Any, b: Any, lb: str) -> str | None:
    """Why tensor ``a`` is not ``b`` (None: equal within float rounding); ``lb`` names ``b``'s model."""
    from onnx import numpy_helper

    if is_external(a) or is_external(b):
        return "names external data (never read, so not the same)"
    if a.data_type != b.data_type:
        return f"data type {a.data_type} where {lb} has {b.data_type}"
    if list(a.dims) != list(b.dims):
        return f"shape {list(a.dims)} where {lb} has {list(b.dims)}"
    try:
        va, vb = numpy_helper.to_array(a), numpy_helper.to_array(b)
    except Exception as exc:  # noqa: BLE001 - a malformed tensor fails in many ways
        return f"cannot be read ({type(exc).__name__})"
    if va.shape != vb.shape or va.dtype != vb.dtype:
        return f"holds {va.size} {va.dtype} values where {lb} holds {vb.size} {vb.dtype}"
    if a.data_type in _float_types() or va.dtype.kind == "f":
        return floats_differ(va, vb)
    if va.dtype.kind == "c":
        return floats_differ(va.real, vb.real) or floats_differ(va.imag, vb.imag)
    if not np.array_equal(va, vb):
        return f"values differ at {int((va != vb).sum()):,} of {va.size:,} elements"
    return None


def sparse_diff(a: Any, b: Any, lb: str) -> str | None:
    if list(a.dims) != list(b.dims):
        return f"shape {list(a.dims)} where {lb} has {list(b.dims)}"
    for part in ("values", "indices"):
        d = tensor_diff(getattr(a, part), getattr(b, part), lb)
        if d:
            return f"{part} {d}"
    return None


def value_diff(a: tuple[Any, str], b: tuple[Any, str], lb: str) -> str | None:
    if a[1] != b[1]:
        return f"a {a[1]} tensor where {lb} has a {b[1]} one"
    return tensor_diff(a[0], b[0], lb) if a[1] == "dense" else sparse_diff(a[0], b[0], lb)


def type_sig(tp: Any) -> Any:
    """A value's type with symbolic dimension names left out (exporters name them their own way)."""
    if tp is None:
        return None
    if tp.HasField("tensor_type"):
        tt = tp.tensor_type
        shape = (tuple(d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim)
                 if tt.HasField("shape") else None)
        return ("tensor", tt.elem_type, shape)
    return tp.SerializeToString(deterministic=True)
