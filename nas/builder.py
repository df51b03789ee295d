"""``build(ArchConfig) -> nn.Module`` through the block registry."""

from __future__ import annotations

import torch
from torch import nn

from nas.blocks import conv_bn_act, create_block, kernel_2d, stride_2d
from nas.config import ArchConfig

__all__ = ["Net", "build", "output_size", "shared_with"]


def shared_with(arch: ArchConfig) -> list[int]:
    """For each block, the index of the block whose weights it uses (itself unless shared)."""
    first: dict[tuple, int] = {}
    out = []
    cin = arch.stem_channels
    for i, cfg in enumerate(arch.blocks):
        key = (cin, cfg)
        out.append(first.setdefault(key, i) if arch.share else i)
        cin = cfg.out_channels
    return out


def output_size(arch: ArchConfig) -> tuple[int, int]:
    """Spatial size after the body (odd kernels with k//2 padding: ceil(size / stride))."""
    h, w = arch.input_size
    for b in (arch.stem_stride, *(b.stride for b in arch.blocks)):
        if arch.spatial == "2d":
            h = (h - 1) // b + 1
        w = (w - 1) // b + 1
    return h, w


class Net(nn.Module):
    """Stem -> body blocks -> classifier head. Plain layers only, so ONNX export is direct."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.stem = conv_bn_act(arch.in_channels, arch.stem_channels, kernel_2d(arch.stem_kernel, arch.spatial),
                                stride_2d(arch.stem_stride, arch.spatial))
        body: list[nn.Module] = []
        cin = arch.stem_channels
        for k, (cfg, owner) in enumerate(zip(arch.blocks, shared_with(arch))):
            # ALBERT-style cross-layer sharing: a shared block runs its owner's module (and weights)
            body.append(body[owner] if owner != k else create_block(cin, cfg, arch.spatial))
            cin = cfg.out_channels
        self.body = nn.Sequential(*body)
        if arch.head == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            features = cin
        elif arch.head == "flatten":
            self.pool = nn.Identity()
            h, w = output_size(arch)
            features = cin * h * w
        else:
            raise ValueError(f"unknown head {arch.head!r} (allowed: gap, flatten)")
        self.dropout = nn.Dropout(arch.dropout) if arch.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(features, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def build(arch: ArchConfig) -> Net:
    """Build the network an :class:`ArchConfig` describes (same config -> same structure)."""
    return Net(arch)
