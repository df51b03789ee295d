"""Weight quantization: fake quantization with a straight-through estimator, and the integer
codes the packed file stores.

Modes: ``fp32`` (none), ``fp16``, ``int8`` / ``int4`` / ``int2`` (symmetric, one scale per
output channel, zero point 0), ``ternary`` ({-a, 0, +a}, threshold 0.7 mean|w| as in TWN) and
``binary`` (sign(w) * mean|w| per output channel, as in XNOR-Net's weight binarization).
Sub-8-bit modes are trained with fake quantization and stored packed; they deploy as int8.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "QUANT_MODES",
    "INT_BITS",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize",
    "FakeQuant",
    "quantizable_layers",
    "apply_fake_quant_",
    "bake_",
]

QUANT_MODES = ("fp32", "fp16", "int8", "int4", "int2", "ternary", "binary")
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
# Bits per stored weight code (fp16/fp32: bits per value).
CODE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2, "ternary": 2, "binary": 1}


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def quantize_codes(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (same shape as ``w``) and one float scale per output channel.

    ``dequantize_codes(codes, scale)`` gives the quantized weights. int modes: codes in
    [-(2^(b-1)-1), 2^(b-1)-1]; ternary: {-1, 0, 1}; binary: {-1, 1}.
    """
    flat = _per_channel(w.detach().float())
    if mode in INT_BITS:
        qmax = 2 ** (INT_BITS[mode] - 1) - 1
        scale = flat.abs().amax(1).clamp_min(1e-12) / qmax
        codes = torch.round(flat / scale[:, None]).clamp(-qmax, qmax)
    elif mode == "ternary":
        delta = 0.7 * flat.abs().mean(1, keepdim=True)
        codes = torch.where(flat > delta, 1.0, torch.where(flat < -delta, -1.0, 0.0))
        kept = codes.abs()
        scale = (flat.abs() * kept).sum(1) / kept.sum(1).clamp_min(1)
        scale = torch.where(kept.sum(1) > 0, scale, torch.full_like(scale, 1e-12))
    elif mode == "binary":
        # zeros stay zero (pruned weights keep their mask); the scale is over the live weights
        codes = torch.sign(flat)
        live = codes.abs().sum(1)
        scale = (flat.abs().sum(1) / live.clamp_min(1)).clamp_min(1e-12)
    else:
        raise ValueError(f"mode {mode!r} has no integer codes (allowed: {', '.join(list(INT_BITS) + ['ternary', 'binary'])})")
    return codes.reshape(w.shape).to(torch.int8), scale


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = [-1] + [1] * (codes.dim() - 1)
    return codes.float() * scale.reshape(shape)


def fake_quantize(w: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantize-dequantize ``w``; the gradient passes straight through (STE)."""
    if mode == "fp32":
        return w
    if mode == "fp16":
        q = w.half().float()
    else:
        codes, scale = quantize_codes(w, mode)
        q = dequantize_codes(codes, scale).to(w.dtype)
    return w + (q - w).detach()


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


def apply_fake_quant_(model: nn.Module, modes: dict[str, str]) -> None:
    """Register fake quantization on each named layer's weight (in place)."""
    seen: set[int] = set()
    for name, layer in quantizable_layers(model):
        mode = modes.get(name, "fp32")
        if mode == "fp32" or id(layer) in seen:  # shared layers get one parametrization
            continue
        seen.add(id(layer))
        parametrize.register_parametrization(layer, "weight", FakeQuant(mode))


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
                    if mode == "fp16":
                        layer.weight.copy_(layer.weight.half().float())
                    elif mode != "fp32":
                        layer.weight.copy_(dequantize_codes(*quantize_codes(layer.weight, mode)))
