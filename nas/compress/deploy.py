"""The deployable ONNX model of a packed candidate, and the check that it carries exactly the
packed weights.

Integer precisions deploy as int8 QDQ whose weights are exactly the packed codes and scales;
float precisions, and methods whose values are not an int8 grid (clustering), deploy as fp32
carrying the decoded packed values exactly. Which precision deploys how is each codec's
``deploy`` field; nothing here names a precision or a gene.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from nas.compress.passes import active_methods
from nas.compress.registry import CODECS
from nas.config import ArchConfig
from nas.trust import graphs_in

if TYPE_CHECKING:
    from nas.config import CompressionConfig

__all__ = ["Deployed", "deploy_onnx", "onnx_predict", "weights_off_packed"]


def _module_of(node) -> str:  # noqa: ANN001
    """The top-level module an exported ONNX node came from (``stem``, ``body.3``, ``classifier``),
    read from the scopes the torch.export-based exporter records on every node, or from the
    node name the TorchScript-based one gives (``/body/body.3/depthwise/depthwise.0/Conv``)."""
    import ast

    props = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    if not scopes and node.name.startswith("/"):
        scopes = [s for s in node.name.split("/")[1:-1] if s != "body"] or [node.name.split("/")[1]]
    for s in scopes:
        if s.startswith("body.") and s.count(".") == 1:
            return s + "."
    return next((s for s in scopes if s), "")


class _Calibration:
    """ONNX Runtime calibration reader over a few real training inputs."""

    def __init__(self, name: str, x: torch.Tensor) -> None:
        self.items = iter([{name: x[i : i + 1].numpy()} for i in range(len(x))])

    def get_next(self):  # noqa: ANN201
        return next(self.items, None)


def _grid_overrides(graph, cfg: CompressionConfig, arch: ArchConfig) -> tuple[dict[str, list[dict]], list[str]]:  # noqa: ANN001
    """Per-channel scales that put each integer-precision layer's deployed int8 weights exactly
    on its packed codes, and the float layers to keep out of quantization.

    A layer stored as codes ``c`` (|c| <= qmax of its precision) with one scale per output
    channel reaches the graph as ``c * s`` (times the BatchNorm factor the exporter folded in,
    also per output channel). So ``max |w| / qmax`` per output channel *is* that channel's
    scale, and ``round(w / scale)`` gives back exactly ``c``; ONNX Runtime's own int8 scale
    (``max |w| / 127``) would re-quantize int4/int2/ternary/binary codes onto another grid."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    overrides: dict[str, list[dict]] = {}
    exclude: list[str] = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        codec = CODECS[cfg.stage_precision(arch.stage_of(_module_of(node)))]
        if codec.deploy != "int8":
            exclude.append(node.name)
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.ndim - 1
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        scales = np.where(amax > 0, amax / codec.qmax, 1.0).astype(np.float32)
        overrides[node.input[1]] = [{"scale": np.float32(sc), "zero_point": np.int8(0), **({"axis": axis} if i == 0 else {})}
                                    for i, sc in enumerate(scales)]
    return overrides, exclude


def weights_off_packed(deployed: Path, reference) -> list[str]:  # noqa: ANN001
    """Names of Conv/Gemm/MatMul weights of the ``deployed`` ONNX model that do not equal the
    ``reference`` fp32 graph's (the packed model exported as is): int8 weights are compared
    after dequantization with their own scales and zero points. Empty: the deployed graph
    carries exactly the packed weights."""
    import onnx
    from onnx import numpy_helper

    q = onnx.load(str(deployed)).graph
    q_nodes = list(graph_nodes(q))  # control flow (early exits) nests layers in subgraphs
    # Every initializer name once in the whole model: a second tensor of the same name in
    # another (sub)graph would let the one that runs differ from the one checked.
    seen: set[str] = set()
    for g in graphs_in(q):
        for init in g.initializer:
            if init.name in seen:
                return [f"{init.name} (defined twice)"]
            seen.add(init.name)
    q_inits = {i.name: i for g in graphs_in(q) for i in g.initializer}
    f_inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in reference.initializer}
    unclaimed = [a for a in f_inits.values()]  # matched by value at most once each
    dq = {n.output[0]: n for n in q_nodes if n.op_type == "DequantizeLinear"}
    bad = []
    for node in q_nodes:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        src = node.input[1]
        if src in dq and dq[src].input[0] in q_inits:  # int8 weight: DequantizeLinear(codes, scale, zp)
            d = dq[src]
            codes = numpy_helper.to_array(q_inits[d.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(q_inits[d.input[1]]).astype(np.float64)
            zp = numpy_helper.to_array(q_inits[d.input[2]]).astype(np.float64) if len(d.input) > 2 else 0 * scale
            axis = next((onnx.helper.get_attribute_value(a) for a in d.attribute if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            if scale.ndim:
                shape[axis] = -1
            w = (codes - zp.reshape(shape)) * scale.reshape(shape)
            name = d.input[0].removesuffix("_quantized")
        elif src in q_inits:
            w, name = numpy_helper.to_array(q_inits[src]).astype(np.float64), src
        else:
            continue
        def same(ref: np.ndarray) -> bool:
            return ref.shape == w.shape and not (
                w.size and np.abs(w - ref).max() > 1e-5 * max(1.0, float(np.abs(ref).max())))

        ref = f_inits.get(name)
        if ref is not None:
            if not same(ref):
                bad.append(name)
            continue
        # a graph assembled from parts (early exits) names its tensors its own way: then the
        # weight must equal a reference weight of its shape that no other layer matched
        match = next((i for i, r in enumerate(unclaimed) if same(r)), None)
        if match is None:
            bad.append(name)
        else:
            unclaimed.pop(match)
    return bad


def graph_nodes(graph):  # noqa: ANN001, ANN201
    """Every node of ``graph`` and of its subgraphs."""
    for g in graphs_in(graph):
        yield from g.node


class Deployed(NamedTuple):
    """A written deployable model: where, its deployed precision's label, and which exporter
    traced it (``torchscript``, ``dynamo``; a method that writes its own graph names its own)."""

    path: Path
    precision: str
    exporter: str


def deploy_onnx(model: nn.Module, cfg: CompressionConfig, example: torch.Tensor, path: Path,
                calibration: torch.Tensor, *, normalize: tuple[Any, Any] | None = None) -> Deployed:
    """Write the deployable ONNX model; returns (path, deployed precision, exporter).

    ``normalize``: ``(mean, std)`` of the training inputs; the written graph then takes raw
    inputs and normalises them in its first nodes (:mod:`nas.preprocess`), after quantization,
    so calibration and the int8 grid see the normalised inputs the network was trained on.
    ``model``, ``example`` and ``calibration`` are in the normalised domain either way.

    Integer precisions (int8 down to binary) deploy as int8 QDQ whose weights are exactly the
    packed codes and scales (see :func:`_grid_overrides`), with activations quantized from
    calibration data (static, uint8). fp32/fp16 layers and clustered weights (a codebook
    that is not an int8 grid) deploy as fp32, carrying the decoded packed values exactly."""
    deployed = _deploy_bare(model, cfg, example, path, calibration)
    if normalize is not None:
        from nas.preprocess import prepend_normalization

        prepend_normalization(deployed.path, *normalize)
    return deployed


def _deploy_bare(model: nn.Module, cfg: CompressionConfig, example: torch.Tensor, path: Path,
                 calibration: torch.Tensor) -> Deployed:
    from nas.onnxio import export_onnx_as

    for m in active_methods(cfg):  # a method that owns its graph (control flow) writes it itself
        owned = m.deploy(model, cfg, example, path)
        if owned is not None:
            return Deployed(path, *owned)
    forced = next((label for m in active_methods(cfg) if (label := m.float_deploy(cfg))), None)
    if forced or not any(CODECS[p].deploy == "int8" for p in cfg.precisions):
        written, exporter = export_onnx_as(model, example, path)
        return Deployed(written, forced or "fp32", exporter)
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader_cls = type("Reader", (_Calibration, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="nas-q-") as tmp:
        fp32, exporter = export_onnx_as(model, example, Path(tmp) / "fp32.onnx")
        graph = onnx.load(str(fp32)).graph
        name = graph.input[0].name
        overrides, exclude = _grid_overrides(graph, cfg, model.arch)
        out_tmp = path.with_name(path.name + ".tmp")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
        try:
            quantize_static(str(fp32), str(out_tmp), reader_cls(name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude,
                            extra_options={"TensorQuantOverrides": overrides,
                                           # the weight scales are the packed ones: never adjusted
                                           "QDQDisableWeightAdjustForInt32Bias": True})
        finally:
            root.setLevel(level)
        off = weights_off_packed(out_tmp, graph)
        if off:
            raise RuntimeError(f"deploy of {path.name}: int8 weights of {', '.join(off)} are not the packed ones")
        os.replace(out_tmp, path)
    return Deployed(path, "int8" if not exclude else "mixed int8/fp32", exporter)


def onnx_predict(path: Path, x: torch.Tensor) -> np.ndarray:
    """Logits of the exported model in ONNX Runtime (one thread), one sample at a time for a
    batch-1 export."""
    from nas.onnxio import ort_predict, ort_session

    return ort_predict(ort_session(path, 1), x.numpy(), batch=1)
