"""Weight clustering (Deep Compression): each layer's weights share 2^b values.

1-D k-means per layer, initialized linearly between min and max (the initialization Han et
al. found best, since it keeps the rare large weights), over the nonzero weights only so
that pruned zeros stay zero. The packed file stores the codebook and b-bit (or Huffman)
indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.compress.quantize import quantizable_layers, unique_layers
from nas.compress.registry import Method, register_method
from nas.methods import ClusterConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig
    from nas.compress.pack import WeightPlan

__all__ = ["kmeans_1d", "cluster_", "Cluster"]


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (k,) and assignment of each value, by Lloyd's algorithm."""
    v = values.reshape(-1).float()
    k = min(k, int(v.numel()))
    centers = torch.linspace(float(v.min()), float(v.max()), k)
    for _ in range(iters):
        assign = (v[:, None] - centers[None, :]).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, assign, v)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        if torch.allclose(new, centers):
            break
        centers = new
    assign = (v[:, None] - centers[None, :]).abs().argmin(1)
    return centers, assign


@torch.no_grad()
def cluster_(layers: Sequence[nn.Module], bits: int) -> None:
    """Snap each layer's nonzero weights to its 2^bits k-means centroids, in place."""
    for layer in unique_layers(layers):
        w = layer.weight
        nz = w != 0
        if not nz.any():
            continue
        centers, assign = kmeans_1d(w[nz], 2**bits)
        centers = centers.half().float()  # an fp16 codebook: half the bytes in the packed file, exactly
        snapped = w.clone()
        snapped[nz] = centers[assign]
        w.copy_(snapped)


@register_method
class Cluster(Method):
    """k-means weight sharing: each layer's weights snapped to a 2^b-value codebook after the
    other compression; the codebook replaces the precision (stored as b-bit indices)."""

    config, phase = ClusterConfig, "snap"
    example, effect = {"cluster_bits": 4}, ("bytes",)

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        cluster_([m for _, m in quantizable_layers(model)], cfg.cluster_bits)
        return model

    def plan(self, plan: WeightPlan, layer: str, model: Any, cfg: CompressionConfig) -> WeightPlan:
        return dataclasses.replace(plan, codebook_bits=cfg.cluster_bits)

    def float_rest(self, cfg: CompressionConfig) -> bool:
        return True

    def float_deploy(self, cfg: CompressionConfig) -> str | None:
        # codebook values are not an int8 grid: the exact values deploy as fp32
        return "fp32 (clustered weights)"

    def value_dependent(self, cfg: CompressionConfig) -> bool:
        return True  # how many codebook entries are used depends on the trained weights
