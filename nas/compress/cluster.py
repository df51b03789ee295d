"""Weight clustering (Deep Compression): each layer's weights share 2^b values.

1-D k-means per layer, initialized linearly between min and max (the initialization Han et
al. found best, since it keeps the rare large weights), over the nonzero weights only so
that pruned zeros stay zero. The packed file stores the codebook and b-bit (or Huffman)
indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["kmeans_1d", "cluster_"]


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
    seen: set[int] = set()
    for layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        w = layer.weight
        nz = w != 0
        if not nz.any():
            continue
        centers, assign = kmeans_1d(w[nz], 2**bits)
        snapped = w.clone()
        snapped[nz] = centers[assign]
        w.copy_(snapped)
