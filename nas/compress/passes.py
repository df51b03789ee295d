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
           "onnx_predict"]

# Precisions that deploy as int8 (QDQ, real int8 kernels in ONNX Runtime).
INT_DEPLOY = ("int8", "int4", "int2", "ternary", "binary")

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


def deploy_onnx(model: nn.Module, cfg: CompressionConfig, example: torch.Tensor, path: Path,
                calibration: torch.Tensor, exported: Exported | None = None) -> tuple[Path, str]:
    """Write the deployable ONNX model: int8 QDQ (static, calibrated, per-channel weights)
    where the precision is integer, else fp32. Returns (path, deployed precision).

    ``exported``: an earlier export of a model of the same shape (the pre-flight one); its
    graph is re-weighted with ``model``'s weights instead of exporting again."""
    from nas.measure import export_onnx

    def fp32_onnx(dest: Path) -> Path:
        if exported is None:
            return export_onnx(model, example, dest)
        return exported.save_with(model, dest, calibration[:16])[0]

    if not any(p in INT_DEPLOY for p in cfg.precisions):
        return fp32_onnx(path), "fp32"
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    reader_cls = type("Reader", (_Calibration, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="nas-q-") as tmp:
        fp32 = fp32_onnx(Path(tmp) / "fp32.onnx")
        graph = onnx.load(str(fp32)).graph
        name = graph.input[0].name
        # mixed precision: layers of fp32/fp16 stages stay float in the deployed graph
        exclude = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                   and cfg.stage_precision(layer_stage(_module_of(n), model.arch)) not in INT_DEPLOY]
        out_tmp = path.with_name(path.name + ".tmp")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
        try:
            quantize_static(str(fp32), str(out_tmp), reader_cls(name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude)
        finally:
            root.setLevel(level)
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
