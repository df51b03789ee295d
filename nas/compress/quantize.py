"""Weight quantization: fake quantization with a straight-through estimator, and the integer
codes the packed file stores.

Modes: ``fp32`` (none), ``fp16``, ``int8`` / ``int4`` / ``int2`` (symmetric, one scale per
output channel, zero point 0), ``ternary`` ({-a, 0, +a}, threshold 0.7 mean|w| as in TWN) and
``binary`` (sign(w) * mean|w| per output channel, as in XNOR-Net's weight binarization).
Sub-8-bit modes are trained with fake quantization and stored packed; they deploy as int8
QDQ whose int8 weights are exactly their codes. Each precision is a registered
:class:`~nas.compress.registry.Codec`; the ``quant`` gene is the :class:`Quantize` method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from nas.compress.registry import (
    CODECS,
    Codec,
    Method,
    register_codec,
    register_method,
)
from nas.genes import PRECISIONS
from nas.methods import QuantConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig
    from nas.compress.pack import WeightPlan

T = TypeVar("T")

__all__ = [
    "unique_layers",
    "QUANT_MODES",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize",
    "FakeQuant",
    "quantizable_layers",
    "apply_fake_quant_",
    "bake_",
    "Quantize",
]


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Scales on the fp16 grid (the packed file stores them in 2 bytes, exactly); a scale too
    small for fp16 (a channel of zeros) becomes fp16's smallest step."""
    s = scale.half().float()
    return torch.where(s > 0, s, torch.full_like(s, 2.0**-24))


def _symmetric(bits: int):  # noqa: ANN202
    qmax = 2 ** (bits - 1) - 1

    def encode(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = _fp16(flat.abs().amax(1) / qmax)
        return torch.round(flat / scale[:, None]).clamp(-qmax, qmax), scale

    return encode


def _ternary(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """{-a, 0, +a}, threshold 0.7 mean|w| as in TWN."""
    delta = 0.7 * flat.abs().mean(1, keepdim=True)
    codes = torch.where(flat > delta, 1.0, torch.where(flat < -delta, -1.0, 0.0))
    kept = codes.abs()
    scale = (flat.abs() * kept).sum(1) / kept.sum(1).clamp_min(1)
    return codes, _fp16(torch.where(kept.sum(1) > 0, scale, torch.zeros_like(scale)))


def _binary(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sign(w) * mean|w| per output channel (XNOR-Net); zeros stay zero (pruned weights keep
    their mask) and the scale is over the live weights."""
    codes = torch.sign(flat)
    live = codes.abs().sum(1)
    return codes, _fp16(flat.abs().sum(1) / live.clamp_min(1))


# each precision of nas.genes.PRECISIONS (bits, kind, deploy, symbol mapping: torch-free, read by
# the gene checks) with its torch encoder
_ENCODERS = {"fp32": {"fake": lambda w: w}, "fp16": {"fake": lambda w: w.half().float()},
             "int8": {"encode": _symmetric(8)}, "int4": {"encode": _symmetric(4)}, "int2": {"encode": _symmetric(2)},
             "ternary": {"encode": _ternary}, "binary": {"encode": _binary}}
for _name, _precision in PRECISIONS.items():
    register_codec(Codec(**dataclasses.asdict(_precision), **_ENCODERS[_name]))
QUANT_MODES = tuple(CODECS)


def quantize_codes(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (same shape as ``w``) and one float scale per output channel, by the
    codec's own rule; ``dequantize_codes(codes, scale)`` gives the quantized weights."""
    codec = CODECS[mode]
    if codec.encode is None:
        ints = ", ".join(c.name for c in CODECS.values() if c.encode is not None)
        raise ValueError(f"mode {mode!r} has no integer codes (allowed: {ints})")
    codes, scale = codec.encode(_per_channel(w.detach().float()))
    return codes.reshape(w.shape).to(torch.int8), scale


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = [-1] + [1] * (codes.dim() - 1)
    return codes.float() * scale.reshape(shape)


def snap(w: torch.Tensor, mode: str) -> torch.Tensor:
    """``w`` on the codec's grid (quantize-dequantize), no gradient semantics."""
    codec = CODECS[mode]
    if codec.fake is not None:
        return codec.fake(w)
    return dequantize_codes(*quantize_codes(w, mode)).to(w.dtype)


def fake_quantize(w: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantize-dequantize ``w``; the gradient passes straight through (STE)."""
    q = snap(w, mode)
    return w if q is w else w + (q - w).detach()


class FakeQuant(nn.Module):
    """A parametrization: the layer sees quantized weights, the optimizer updates the float ones."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.mode)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and Linear layers, the ones whose weights are quantized, clustered and sparsified."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def unique_layers(layers: Iterable[T], module: Callable[[T], nn.Module] = lambda x: x) -> Iterator[T]:
    """Each layer once: blocks that share weights (the ``share`` gene) list one module under
    several names, and it must get one parametrization, one codebook, one mask."""
    seen: set[int] = set()
    for item in layers:
        if id(module(item)) not in seen:
            seen.add(id(module(item)))
            yield item


def apply_fake_quant_(model: nn.Module, modes: dict[str, str]) -> None:
    """Register fake quantization on each named layer's weight (in place)."""
    low = ((n, m) for n, m in quantizable_layers(model) if CODECS[modes.get(n, "fp32")].bits < 32)
    for name, layer in unique_layers(low, lambda pair: pair[1]):
        parametrize.register_parametrization(layer, "weight", FakeQuant(modes[name]))


def bake_(model: nn.Module) -> None:
    """Replace every parametrized weight by its current (quantized/masked) value, in place.

    Quantized weights are then snapped exactly onto their grid (the STE's ``w + (q - w)`` is
    only equal to ``q`` up to rounding), so packing them is lossless."""
    for _, layer in list(model.named_modules()):
        if parametrize.is_parametrized(layer):
            modes = [p.mode for p in layer.parametrizations["weight"] if isinstance(p, FakeQuant)]
            for pname in list(layer.parametrizations.keys()):
                parametrize.remove_parametrizations(layer, pname, leave_parametrized=True)
            for mode in modes:
                with torch.no_grad():
                    layer.weight.copy_(snap(layer.weight, mode))


def _layer_modes(model: nn.Module, cfg: CompressionConfig) -> dict[str, str]:
    return {n: cfg.stage_precision(model.arch.stage_of(n)) for n, _ in quantizable_layers(model)}


@register_method
class Quantize(Method):
    """Weight precision per layer (per stage when sampled per stage), trained with fake
    quantization (STE) and stored as the codec's codes."""

    config, phase = QuantConfig, "parametrize"
    example, effect = {"quant": "int4"}, ("bytes",)

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        apply_fake_quant_(model, _layer_modes(model, cfg))
        return model

    def wants_finetune(self, cfg: CompressionConfig) -> bool:
        return self.active(cfg)

    def plan(self, plan: WeightPlan, layer: str, model: Any, cfg: CompressionConfig) -> WeightPlan:
        return dataclasses.replace(plan, codec=cfg.stage_precision(model.arch.stage_of(layer)))

    def float_rest(self, cfg: CompressionConfig) -> bool:
        return any(CODECS[p].bits < 32 for p in cfg.precisions)

    def card_notes(self, cfg: CompressionConfig) -> list[str]:
        low = [p for p in cfg.precisions if CODECS[p].kind == "int" and CODECS[p].bits < 8]
        if low and not cfg.cluster_bits and not getattr(cfg, "weight_only", False):
            return [f"- Weights below 8 bits ({', '.join(low)}) are stored packed and run as int8 in ONNX Runtime "
                    "(no sub-8-bit kernels); the int8 weights are exactly the packed codes."]
        return []
