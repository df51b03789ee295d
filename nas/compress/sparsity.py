"""Unstructured magnitude sparsity: the smallest |w| of each dense conv/linear layer zeroed and
kept at zero by a mask while fine-tuning. Dense kernels run at full cost, so only the packed
size benefits (nonzeros behind a 1-bit mask); reports and model cards say so."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nas.compress.quantize import quantizable_layers, unique_layers
from nas.compress.registry import CODECS, Method, register_method
from nas.methods import SparsityConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig
    from nas.compress.pack import WeightPlan

__all__ = ["apply_sparsity_", "sparse_layers", "Sparsity"]


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def apply_sparsity_(layers: Sequence[nn.Module], sparsity: float) -> None:
    """Unstructured magnitude pruning: zero the smallest |w| of each layer, kept at zero by a
    mask parametrization while fine-tuning. Only the packed size benefits (dense kernels)."""
    for layer in unique_layers(layers):
        w = layer.weight.detach()
        k = int(math.floor(w.numel() * sparsity))
        if k == 0:
            continue
        threshold = w.abs().reshape(-1).kthvalue(k).values
        mask = (w.abs() > threshold).float()
        parametrize.register_parametrization(layer, "weight", _Mask(mask))


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers that unstructured pruning thins: dense convs and linears. The stem and depthwise
    convs hold a handful of weights per filter; zeroing most of them destroys the model."""
    return {n: m for n, m in quantizable_layers(model) if not n.startswith("stem") and getattr(m, "groups", 1) == 1}


@register_method
class Sparsity(Method):
    config, phase = SparsityConfig, "parametrize"
    example, effect = {"sparsity": 0.7}, ("bytes",)

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        apply_sparsity_(list(sparse_layers(model).values()), cfg.sparsity)
        return model

    def wants_finetune(self, cfg: CompressionConfig) -> bool:
        return True

    def plan(self, plan: WeightPlan, layer: str, model: Any, cfg: CompressionConfig) -> WeightPlan:
        return dataclasses.replace(plan, sparse=layer in sparse_layers(model))

    def value_dependent(self, cfg: CompressionConfig) -> bool:
        # how many low-bit codes round to zero behind the mask depends on the trained values
        return cfg.cluster_bits > 0 or any(CODECS[p].kind == "int" for p in cfg.precisions)

    def card_notes(self, cfg: CompressionConfig) -> list[str]:
        return ["- Unstructured sparsity shrinks the file only; dense kernels run at full cost."]
