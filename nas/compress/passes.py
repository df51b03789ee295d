"""``compress(model, cfg, ...)``: every compression gene as a pass, run in order.

prune (structured, iterative rounds, fine-tune) -> low-rank (SVD, fine-tune) -> unstructured
sparsity + quantization-aware fine-tuning (fake quant, STE) -> bake -> weight clustering ->
pack. Cross-layer sharing is structural and happens when the model is built.

:func:`final_model` builds the compressed *shape* of a candidate with untrained weights: the
pre-flight measures it, and the packed file loads into it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from nas.builder import Net, build
from nas.compress.cluster import cluster_
from nas.compress.lowrank import lowrank_
from nas.compress.pack import WeightPlan, pack_state, unpack_state
from nas.compress.prune import apply_sparsity_, prune_structured, pruned_arch, target_widths
from nas.compress.quantize import apply_fake_quant_, bake_, quantizable_layers
from nas.config import ArchConfig, Candidate, CompressionConfig, Recipe
from nas.train import train

if TYPE_CHECKING:
    from nas.measure import Exported

__all__ = ["INT_DEPLOY", "structural_arch", "final_model", "compress", "pack_model", "load_packed", "deploy_onnx", "layer_stage",
           "onnx_predict", "weights_off_packed"]

# Precisions that deploy as int8 (QDQ, real int8 kernels in ONNX Runtime), and the largest
# code each stores (its int8 weights are exactly those codes).
INT_DEPLOY = ("int8", "int4", "int2", "ternary", "binary")
QMAX = {"int8": 127, "int4": 7, "int2": 1, "ternary": 1, "binary": 1}

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def structural_arch(cand: Candidate) -> ArchConfig:
    """The architecture after the structural genes: sharing and structured pruning widths."""
    cfg = cand.compression
    arch = dataclasses.replace(cand.arch, share=cfg.share)
    if cfg.prune != "none":
        ratios = [cfg.stage_ratio(s) for s in range(max(b.stage for b in arch.blocks) + 1)]
        if any(r > 0 for r in ratios):
            arch = pruned_arch(arch, target_widths(arch, ratios))
    return arch


def final_model(cand: Candidate) -> Net:
    """Untrained model of the final compressed shape (pruned, shared, factorized)."""
    model = build(structural_arch(cand))
    lowrank_(model, cand.compression.lowrank, use_weights=False)
    return model


def layer_stage(name: str, arch: ArchConfig) -> int:
    if name.startswith("body."):
        return arch.blocks[int(name.split(".")[1])].stage
    if name.startswith("stem"):
        return arch.blocks[0].stage if arch.blocks else 0
    return arch.blocks[-1].stage if arch.blocks else 0


def _sparse_layers(model: Net) -> dict[str, nn.Module]:
    """Layers that unstructured pruning thins: dense convs and linears. The stem and depthwise
    convs hold a handful of weights per filter; zeroing most of them destroys the model."""
    return {n: m for n, m in quantizable_layers(model) if not n.startswith("stem") and getattr(m, "groups", 1) == 1}


def _layer_modes(model: Net, cfg: CompressionConfig) -> dict[str, str]:
    return {n: cfg.stage_precision(layer_stage(n, model.arch)) for n, _ in quantizable_layers(model)}


def _finetune(model: nn.Module, data, recipe: Recipe, epochs: int, seed: int, loss_fn: LossFn | None) -> None:
    if epochs > 0:
        train(model, data.x_train, data.y_train, dataclasses.replace(recipe, epochs=epochs), seed,
              loss_fn=loss_fn, lr_scale=0.3)


def compress(model: Net, cand: Candidate, data, seed: int, loss_fn: LossFn | None = None,
             finetune: bool = True) -> Net:
    """Apply every compression gene to a trained model; returns the compressed model.

    With ``finetune=False`` only the transformations run (the pre-flight uses this on an
    untrained model to get the exact final shape and packed size without training)."""
    cfg, recipe = cand.compression, cand.recipe
    epochs = cfg.finetune_epochs if finetune else 0
    n_stages = max(b.stage for b in model.arch.blocks) + 1
    if cfg.prune != "none" and any(cfg.stage_ratio(s) > 0 for s in range(n_stages)):
        original = model.arch
        ratios = [cfg.stage_ratio(s) for s in range(n_stages)]
        rounds = cfg.prune_rounds if finetune else 1
        for j in range(1, rounds + 1):
            widths = target_widths(original, ratios, fraction=j / rounds)
            # widths are relative to the original arch; map them onto the current (narrower) one
            model = prune_structured(model, widths, cfg.prune)
            _finetune(model, data, recipe, epochs, seed + j, loss_fn)
    if cfg.lowrank > 0 and lowrank_(model, cfg.lowrank):
        _finetune(model, data, recipe, epochs, seed + 101, loss_fn)
    layers = [m for _, m in quantizable_layers(model)]
    modes = _layer_modes(model, cfg)
    if cfg.sparsity > 0:
        apply_sparsity_(list(_sparse_layers(model).values()), cfg.sparsity)
    if cfg.cluster_bits == 0:
        apply_fake_quant_(model, modes)
    if cfg.sparsity > 0 or (cfg.cluster_bits == 0 and any(m != "fp32" for m in modes.values())):
        _finetune(model, data, recipe, epochs, seed + 202, loss_fn)
    bake_(model)
    if cfg.cluster_bits > 0:
        cluster_(layers, cfg.cluster_bits)
    return model


def _plans(model: Net, cfg: CompressionConfig) -> tuple[dict[str, WeightPlan], str]:
    plans = {}
    sparse = _sparse_layers(model) if cfg.sparsity > 0 else {}
    for name, _ in quantizable_layers(model):
        mode = cfg.stage_precision(layer_stage(name, model.arch))
        plans[f"{name}.weight"] = WeightPlan(mode=mode, cluster_bits=cfg.cluster_bits, huffman=cfg.huffman,
                                             sparse=name in sparse)
    other = "fp32" if all(p == "fp32" for p in cfg.precisions) and cfg.cluster_bits == 0 else "fp16"
    return plans, other


def pack_model(model: Net, cfg: CompressionConfig) -> bytes:
    plans, other = _plans(model, cfg)
    return pack_state(model.state_dict(), plans, other)


def load_packed(cand: Candidate, blob: bytes) -> Net:
    """Decode a packed file into the candidate's final-shape model."""
    model = final_model(cand)
    state = unpack_state(blob)
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    model.load_state_dict(state)
    return model.eval()


def _module_of(node) -> str:  # noqa: ANN001
    """The top-level module an exported ONNX node came from (``stem``, ``body.3``, ``classifier``),
    read from the scopes the torch.export-based exporter records on every node."""
    import ast

    props = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
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
        precision = cfg.stage_precision(layer_stage(_module_of(node), arch))
        if precision not in INT_DEPLOY or cfg.cluster_bits:
            exclude.append(node.name)
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.ndim - 1
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        scales = np.where(amax > 0, amax / QMAX[precision], 1.0).astype(np.float32)
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
    q_inits = {i.name: i for i in q.initializer}
    f_inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in reference.initializer}
    dq = {n.output[0]: n for n in q.node if n.op_type == "DequantizeLinear"}
    bad = []
    for node in q.node:
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
        ref = f_inits.get(name)
        if ref is None or ref.shape != w.shape or (
                w.size and np.abs(w - ref).max() > 1e-5 * max(1.0, float(np.abs(ref).max()))):
            bad.append(name)
    return bad


def deploy_onnx(model: nn.Module, cfg: CompressionConfig, example: torch.Tensor, path: Path,
                calibration: torch.Tensor, exported: Exported | None = None) -> tuple[Path, str]:
    """Write the deployable ONNX model; returns (path, deployed precision).

    Integer precisions (int8 down to binary) deploy as int8 QDQ whose weights are exactly the
    packed codes and scales (see :func:`_grid_overrides`), with activations quantized from
    calibration data (static, uint8). fp32/fp16 layers and clustered weights (a codebook
    that is not an int8 grid) deploy as fp32, carrying the decoded packed values exactly.

    ``exported``: an earlier export of a model of the same shape (the pre-flight one); its
    graph is re-weighted with ``model``'s weights instead of exporting again."""
    from nas.measure import export_onnx

    def fp32_onnx(dest: Path) -> Path:
        if exported is None:
            return export_onnx(model, example, dest)
        return exported.save_with(model, dest, calibration[:16])[0]

    if cfg.cluster_bits or not any(p in INT_DEPLOY for p in cfg.precisions):
        return fp32_onnx(path), "fp32 (clustered weights)" if cfg.cluster_bits else "fp32"
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    reader_cls = type("Reader", (_Calibration, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="nas-q-") as tmp:
        fp32 = fp32_onnx(Path(tmp) / "fp32.onnx")
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
    return path, "int8" if not exclude else "mixed int8/fp32"


def onnx_predict(path: Path, x: torch.Tensor) -> np.ndarray:
    """Logits of the exported model in ONNX Runtime, one sample at a time (batch-1 export)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    arr = x.numpy()
    return np.concatenate([sess.run(None, {name: arr[i : i + 1]})[0] for i in range(len(arr))])
