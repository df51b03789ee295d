"""Low-rank factorization of linear layers and 1x1 convolutions by truncated SVD.

``W (out x in) ~= B (out x r) @ A (r x in)`` with ``r = ceil(ratio * min(out, in))``; a layer is
only factorized where ``r * (out + in) < out * in``, i.e. where it saves weights and FLOPs.
The rank depends only on shapes, so the factorized shape is known before training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.compress.registry import Method, register_method
from nas.methods import LowRankConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig

__all__ = ["lowrank_", "LowRank"]


def _rank(out_f: int, in_f: int, ratio: float) -> int | None:
    r = max(1, math.ceil(ratio * min(out_f, in_f)))
    return r if r * (out_f + in_f) < out_f * in_f else None


def _factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]  # B (out, r), A (r, in)


def _factorize(layer: nn.Module, ratio: float, use_weights: bool) -> nn.Module | None:
    if isinstance(layer, nn.Linear):
        r = _rank(layer.out_features, layer.in_features, ratio)
        if r is None:
            return None
        first = nn.Linear(layer.in_features, r, bias=False)
        second = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
        if use_weights:
            b, a = _factors(layer.weight.detach(), r)
            first.weight.data.copy_(a)
            second.weight.data.copy_(b)
            if layer.bias is not None:
                second.bias.data.copy_(layer.bias.detach())
        return nn.Sequential(first, second)
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
        r = _rank(layer.out_channels, layer.in_channels, ratio)
        if r is None:
            return None
        first = nn.Conv2d(layer.in_channels, r, 1, layer.stride, bias=False)
        second = nn.Conv2d(r, layer.out_channels, 1, bias=layer.bias is not None)
        if use_weights:
            b, a = _factors(layer.weight.detach().reshape(layer.out_channels, -1), r)
            first.weight.data.copy_(a[:, :, None, None])
            second.weight.data.copy_(b[:, :, None, None])
            if layer.bias is not None:
                second.bias.data.copy_(layer.bias.detach())
        return nn.Sequential(first, second)
    return None


def lowrank_(model: nn.Module, ratio: float, use_weights: bool = True) -> int:
    """Factorize eligible layers in place; return how many were factorized.

    ``use_weights=False`` only changes the structure (for building a model that a packed file
    is then loaded into). Shared layers are replaced once and stay shared.
    """
    if ratio <= 0:
        return 0
    replaced: dict[int, nn.Module | None] = {}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in replaced:
                replaced[id(child)] = _factorize(child, ratio, use_weights)
                count += replaced[id(child)] is not None
            new = replaced[id(child)]
            if new is not None:
                setattr(parent, name, new)
    return count


@register_method
class LowRank(Method):
    """SVD factorization of linear and 1x1 conv layers (rank = ratio x min(in, out)), then
    fine-tuning; the factorized shape is known before training."""

    config, phase = LowRankConfig, "structural"
    example, effect = {"lowrank": 0.25}, ("params",)

    def restructure(self, model: Any, cfg: CompressionConfig) -> None:
        lowrank_(model, cfg.lowrank, use_weights=False)

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        if lowrank_(model, cfg.lowrank):
            ctx.finetune(model, 101)
        return model
