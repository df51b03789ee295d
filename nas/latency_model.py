"""A latency model of one device, for searching when it is offline (``--latency-model``).

``nas probe profile`` times a sample of a space's deployable graphs on the device (through its
probe, or on this host) and writes ``device.json``: the device's identity and, per graph, its
features and measured latency. ``nas search --latency-model device.json`` fits a predictor on
them and every trial's latency is predicted from its deployable ONNX graph, recorded with
``latency_source: predicted`` (``nas verify`` on the device re-times a bundle for real).

Features come from the ONNX graph itself (onnx and numpy only: the file works for any graph a
space deploys, pruned or quantized): per operator class, the multiply-adds and output elements
(dense, depthwise and pointwise convolutions, int8 where the convolution reads a
``DequantizeLinear``, matrix products), node counts by operator, and the weight bytes.

The predictor is chosen by measurement (``experiments/device_latency.py``): see
:data:`METHOD`. ``device.json`` holds only numbers and names (JSON, no pickle); the predictor is
refitted from its samples each time it is loaded, in well under a second.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.errors import ConfigError

__all__ = ["graph_features", "LatencyModel", "FEATURES", "METHOD", "VERSION", "load_latency_model", "read_profile"]

VERSION = 2  # 2: runtime-graph features (a version-1 profile lacks them: write it again)
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_SAMPLES = 100_000
MIN_SAMPLES = 20

_CONV_KINDS = ("dense", "depthwise", "pointwise")
# what ONNX Runtime runs after its graph optimizations (fusions, layout changes), by kernel class
RUNTIME_KERNELS = ("conv_nchwc", "conv_fused", "conv_plain", "qconv")
RUNTIME_NODES = (*RUNTIME_KERNELS, "reorder", "quant", "pool", "gemm", "elementwise", "shape")
FEATURES = tuple(
    [f"{prec}_{kind}_{what}" for prec in ("fp32", "int8") for kind in _CONV_KINDS for what in ("macs", "out")]
    + ["matmul_macs", "elementwise_out", "pool_out", "nodes", "quant_nodes", "weight_bytes", "input_elems"]
    + [f"rt_{k}_{kind}_{what}" for k in RUNTIME_KERNELS for kind in _CONV_KINDS for what in ("macs", "out", "n")]
    + [f"rt_nodes_{b}" for b in RUNTIME_NODES]
    + [f"rt_pad_{k}_{kind}_{what}" for k in RUNTIME_KERNELS for kind in ("depthwise", "dense") for what in ("macs", "out")]
)
# chosen by experiments/device_latency.py (300 random deployable graphs of the default space on
# digits, 225 fitted, 75 held out by architecture; 1 ONNX Runtime thread). With the source graph's
# features alone: within +-10% of measured for 30-44%. With what ONNX Runtime runs (its optimized
# graph: which convolutions became blocked NCHWc kernels, the reorders between layouts, the
# channels padded to whole blocks) added, additive+trees put 77-83% within 10% (three held-out
# splits; Spearman 0.985-0.989), additive 72-76%, trees 60-67%. Re-timing the same graphs: 92-93%.
METHOD = "additive+trees"
RUNTIME_LEVEL = "all"  # ONNX Runtime's optimization level for the runtime features: "all" or "extended"
METHODS = ("additive", "additive+trees", "trees")


def _shape(vi: Any) -> list[int] | None:
    dims = vi.type.tensor_type.shape.dim
    out = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]  # a free (batch) dimension is 1
    return out if dims else None


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """Channels per block of ONNX Runtime's NCHWc kernels on this CPU (MLAS: 16 with AVX-512, else 8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def _padded(w: list[int], out_shape: list[int], group: int, block: int) -> tuple[str, float, float]:
    """(kind, multiply-adds, outputs) of a convolution with its channels rounded up to whole
    blocks: what a blocked kernel computes (a 24-channel layer costs a 32-channel one's work)."""
    cout, cin_per_group, kernel = w[0], w[1], math.prod(w[2:])
    hw = math.prod(out_shape[2:]) if len(out_shape) > 2 else 1
    pad_out = -(-cout // block) * block
    if group > 1 and cin_per_group == 1:
        return "depthwise", float(hw * pad_out * kernel), float(hw * pad_out)
    pad_in = -(-cin_per_group // block) * block if cin_per_group >= 4 else cin_per_group
    return "dense", float(hw * pad_out * pad_in * kernel), float(hw * pad_out)


def _runtime_bucket(domain: str, op: str) -> str:
    if op == "Conv" and domain == "com.microsoft.nchwc":
        return "conv_nchwc"
    if op == "FusedConv":
        return "conv_fused"
    if op == "Conv":
        return "conv_plain"
    if op in ("QLinearConv", "ConvInteger"):
        return "qconv"
    if op in ("ReorderInput", "ReorderOutput"):
        return "reorder"
    if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return "quant"
    if "Pool" in op:
        return "pool"
    if op in ("Gemm", "MatMul", "FusedGemm", "QGemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        return "gemm"
    if op in ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"):
        return "shape"
    return "elementwise"


def runtime_nodes(path: str | Path) -> list[tuple[str, str]]:
    """(domain, op type) of every node ONNX Runtime runs for the graph on this CPU: the graph
    after the session's own optimizations (the timing protocol's: every level), which it writes
    out for us. Fusions and layout changes are what a per-operator table misses (nn-Meter's
    kernel detection); ONNX Runtime is the authority on what it fuses, so it is asked, not imitated."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="nas-lat-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if RUNTIME_LEVEL == "all"
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # the NCHWc transformer warns that the written graph is for this CPU: it is
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    return [(n.domain, n.op_type) for n in graph.node]


def graph_features(path: str | Path) -> dict[str, float]:
    """The features of an ONNX graph (see the module docstring), from onnx's shape inference."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path), load_external_data=False)
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - features from what is known
        pass
    g = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        s = _shape(vi)
        if s is not None:
            shapes[vi.name] = s
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        shapes[name] = list(t.dims)
    producers = {o: n for n in g.node for o in n.output}
    f = dict.fromkeys(FEATURES, 0.0)
    convs: list[tuple[str, float, float, tuple]] = []  # (kind, macs, outputs, padded) of each convolution, in order
    block = nchwc_block()
    f["weight_bytes"] = float(sum(numpy_helper.to_array(t).nbytes for t in g.initializer))
    f["input_elems"] = float(sum(math.prod(shapes.get(i.name, [0])) for i in g.input if i.name not in inits))
    for n in g.node:
        f["nodes"] += 1
        out = float(math.prod(shapes.get(n.output[0], [0]))) if n.output else 0.0
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            f["quant_nodes"] += 1
        elif n.op_type == "Conv":
            w = shapes.get(n.input[1])
            if not w or len(w) < 3:
                continue
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            cin_per_group, kernel = w[1], math.prod(w[2:])
            kind = "depthwise" if group > 1 and cin_per_group == 1 else ("pointwise" if kernel == 1 else "dense")
            src = producers.get(n.input[0])
            prec = "int8" if src is not None and src.op_type == "DequantizeLinear" else "fp32"
            f[f"{prec}_{kind}_macs"] += out * cin_per_group * kernel
            f[f"{prec}_{kind}_out"] += out
            convs.append((kind, out * cin_per_group * kernel, out, _padded(w, shapes.get(n.output[0], []), group, block)))
        elif n.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(n.input[0]), shapes.get(n.input[1])
            if a and b:
                f["matmul_macs"] += out * (a[-1] if n.op_type == "MatMul" else b[0] if len(b) == 2 else 1)
        elif "Pool" in n.op_type:
            f["pool_out"] += float(math.prod(shapes.get(n.input[0], [0])))
        else:
            f["elementwise_out"] += out
    try:
        ran = runtime_nodes(path)
    except Exception:  # noqa: BLE001 - a graph ONNX Runtime cannot load has no runtime features
        return f
    kernels = [b for b in (_runtime_bucket(d, op) for d, op in ran) if b in RUNTIME_KERNELS]
    for b in (_runtime_bucket(d, op) for d, op in ran):
        f[f"rt_nodes_{b}"] += 1
    # fusions keep one kernel per convolution, in graph order: each convolution's work is
    # attributed to the kernel that runs it (counts that disagree: none attributed)
    if len(kernels) == len(convs):
        for k, (kind, macs, out, (pkind, pmacs, pout)) in zip(kernels, convs):
            f[f"rt_{k}_{kind}_macs"] += macs
            f[f"rt_{k}_{kind}_out"] += out
            f[f"rt_{k}_{kind}_n"] += 1
            f[f"rt_pad_{k}_{pkind}_macs"] += pmacs
            f[f"rt_pad_{k}_{pkind}_out"] += pout
    return f


def _vector(f: dict[str, float]) -> np.ndarray:
    return np.array([float(f.get(k, 0.0)) for k in FEATURES])


class LatencyModel:
    """Fit on (features, latency) samples of one device; predicts milliseconds.

    ``additive``: latency = c + sum of non-negative costs per feature (the per-block table's
    form: every operator class adds its own cost per multiply-add, per output element, per
    node), fitted by non-negative least squares on relative error. ``additive+trees``: that,
    times a correction learned by gradient-boosted trees on the log features (what a table
    misses: fusions, cache effects). ``trees``: gradient-boosted trees alone, on log latency."""

    def __init__(self, samples: Sequence[tuple[dict[str, float], float]], method: str = METHOD, seed: int = 0) -> None:
        if method not in METHODS:
            raise ConfigError(f"latency model: method {method!r} (allowed: {', '.join(METHODS)})")
        if len(samples) < MIN_SAMPLES:
            raise ConfigError(f"latency model: {len(samples)} samples; at least {MIN_SAMPLES} are needed")
        self.method = method
        x = np.stack([_vector(f) for f, _ in samples])
        y = np.array([float(v) for _, v in samples])
        self._scale = np.maximum(x.max(0), 1e-12)
        self._coef = None
        self._trees = None
        if method in ("additive", "additive+trees"):
            from scipy.optimize import nnls

            a = np.hstack([np.ones((len(x), 1)), x / self._scale])
            w = 1.0 / y  # relative error: every graph weighs alike, fast or slow
            self._coef, _ = nnls(a * w[:, None], y * w)
        if method in ("additive+trees", "trees"):
            from sklearn.ensemble import GradientBoostingRegressor

            base = self._additive(x) if method == "additive+trees" else np.ones(len(x))
            target = np.log(y / np.maximum(base, 1e-9))
            self._trees = GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                                    random_state=seed).fit(np.log1p(x), target)

    def _additive(self, x: np.ndarray) -> np.ndarray:
        assert self._coef is not None
        return self._coef[0] + (x / self._scale) @ self._coef[1:]

    def predict(self, features: dict[str, float] | Sequence[dict[str, float]]) -> np.ndarray | float:
        one = isinstance(features, dict)
        x = np.stack([_vector(f) for f in ([features] if one else features)])
        if self.method == "additive":
            out = self._additive(x)
        elif self.method == "trees":
            out = np.exp(self._trees.predict(np.log1p(x)))
        else:
            out = self._additive(x) * np.exp(self._trees.predict(np.log1p(x)))
        out = np.maximum(out, 1e-6)
        return float(out[0]) if one else out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_profile(path: str | Path) -> dict[str, Any]:
    """``device.json``, checked as an untrusted file: one line for anything malformed."""
    p = Path(path)
    where = f"--latency-model {p}"
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: {size:,} bytes; a device profile is at most {MAX_FILE_BYTES:,}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: not a JSON device profile ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise ConfigError(f"{where}: not a device profile of version {VERSION} (write one with nas probe profile)")
    device = raw.get("device")
    if not isinstance(device, dict) or not all(isinstance(k, str) and (isinstance(v, str) and len(v) < 300 or _number(v))
                                               for k, v in device.items()):
        raise ConfigError(f"{where}: 'device' must map names to short strings or numbers")
    samples = raw.get("samples")
    if not isinstance(samples, list) or not samples or len(samples) > MAX_SAMPLES:
        raise ConfigError(f"{where}: 'samples' must be a list of 1..{MAX_SAMPLES:,} timed graphs")
    out = []
    for i, s in enumerate(samples):
        if (not isinstance(s, dict) or not isinstance(s.get("features"), dict) or not _number(s.get("latency_ms"))
                or s["latency_ms"] <= 0):
            raise ConfigError(f"{where}: sample {i} needs 'features' (an object) and 'latency_ms' (a number > 0)")
        feats = s["features"]
        unknown = set(feats) - set(FEATURES)
        if unknown or not all(_number(v) and v >= 0 for v in feats.values()):
            raise ConfigError(f"{where}: sample {i}: features must be non-negative numbers named among "
                              f"{', '.join(FEATURES[:3])}... ({'unknown: ' + sorted(unknown)[0] if unknown else 'bad value'})")
        out.append((feats, float(s["latency_ms"])))
    method = raw.get("method", METHOD)
    if method not in METHODS:
        raise ConfigError(f"{where}: method {method!r} (allowed: {', '.join(METHODS)})")
    return {"device": device, "samples": out, "method": method}


_LOADED: dict[str, tuple[LatencyModel, dict[str, Any]]] = {}


def load_latency_model(path: str | Path) -> tuple[LatencyModel, dict[str, Any]]:
    """The fitted model of ``device.json`` and the device's identity (cached per process)."""
    key = str(Path(path).resolve())
    if key not in _LOADED:
        prof = read_profile(path)
        _LOADED[key] = (LatencyModel(prof["samples"], prof["method"]), prof["device"])
    return _LOADED[key]

