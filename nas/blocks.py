"""Block registry: every searchable body block, built from a :class:`BlockConfig`.

``@register_block(name)`` adds a class; :func:`create_block` looks it up. The builder, the
space validator and the tests all iterate over :data:`BLOCKS`, so a new block gets
validation and forward/backward/export tests by being registered.

Every block works on NCHW tensors. A 1-D signal is an image of height 1, so in a ``1d``
space kernels are 1xN and strides act on the width only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas.config import BLOCK_TYPES, BlockConfig, BlockType

__all__ = ["BLOCKS", "register_block", "create_block", "kernel_2d", "stride_2d", "hidden_width", "has_residual", "channel_roles"]

BLOCKS: dict[str, type[nn.Module]] = {}


def register_block(name: str, kind: BlockType | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a block class under ``name``; ``kind`` is what records and spaces know of it
    (:class:`~nas.config.BlockType`: the built-in ones are declared there, torch-free)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        # a plain nn.Module gets the Block defaults for the facts it does not declare
        for fact in ("hidden", "has_hidden", "ties_input", "roles"):
            if not hasattr(cls, fact):
                setattr(cls, fact, Block.__dict__[fact])
        BLOCKS[name] = cls
        if kind is not None or name not in BLOCK_TYPES:
            BLOCK_TYPES[name] = kind or BlockType(name)
        return cls

    return deco


def kernel_2d(k: int, spatial: str) -> tuple[int, int]:
    return (1, k) if spatial == "1d" else (k, k)


def stride_2d(s: int, spatial: str) -> tuple[int, int]:
    return (1, s) if spatial == "1d" else (s, s)


def _pad(kernel: tuple[int, int]) -> tuple[int, int]:
    return (kernel[0] // 2, kernel[1] // 2)


# Channel roles, for structured pruning: for each conv/BN of a block, which channel group its
# output dim (and a dense conv's input dim) belongs to: the block's input ("in"), output
# ("out") or hidden width ("hid"). Depthwise convs have no input role (one filter per channel).
Roles = list[tuple[str, str, str | None]]


def has_residual(cfg: BlockConfig, in_channels: int) -> bool:
    """Identity shortcut (mbconv) or identity block (skip): explicit, else where shapes allow."""
    if cfg.residual is not None:
        return cfg.residual
    return cfg.stride == 1 and in_channels == cfg.out_channels


def hidden_width(cfg: BlockConfig, in_channels: int) -> int:
    """Width of a block's inner layer: explicit (after pruning) or derived from the genes."""
    if cfg.hidden is not None:
        return cfg.hidden
    return BLOCKS[cfg.type].hidden(cfg, in_channels)


class Block(nn.Module):
    """Base of registered blocks: the facts structured pruning and the summary need live with
    each block class (defaults: no hidden width of its own, no identity path)."""

    @staticmethod
    def hidden(cfg: BlockConfig, cin: int) -> int:
        return cfg.out_channels

    @staticmethod
    def has_hidden(cfg: BlockConfig) -> bool:
        """Whether it has a hidden width that is a channel group of its own."""
        return False

    @staticmethod
    def ties_input(cfg: BlockConfig, cin: int) -> bool:
        """Whether its output is tied to its input channels (an identity path)."""
        return False

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        raise ValueError(f"block type {cfg.type!r} declares no channel roles (structured pruning needs them)")


def conv_bn_act(
    cin: int,
    cout: int,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, _pad(kernel), groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_block("conv")
class ConvBlock(Block):
    """Standard KxK convolution, BatchNorm, ReLU."""

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        return [("conv.0", "out", "in"), ("conv.1", "out", None)]

    def __init__(self, cin: int, cfg: BlockConfig, spatial: str) -> None:
        super().__init__()
        self.conv = conv_bn_act(
            cin, cfg.out_channels, kernel_2d(cfg.kernel, spatial), stride_2d(cfg.stride, spatial)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@register_block("dsconv")
class DepthwiseSeparable(Block):
    """Depthwise KxK then pointwise 1x1 (MobileNet): ~1/N + 1/K^2 of a standard conv's cost."""

    @staticmethod
    def hidden(cfg: BlockConfig, cin: int) -> int:
        return cin

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        return [("depthwise.0", "in", None), ("depthwise.1", "in", None), ("pointwise.0", "out", "in"),
                ("pointwise.1", "out", None)]

    def __init__(self, cin: int, cfg: BlockConfig, spatial: str) -> None:
        super().__init__()
        # The depthwise conv keeps the input width; pruning narrows it by pruning the
        # previous block's outputs, so this block has no hidden width of its own.
        self.depthwise = conv_bn_act(
            cin, cin, kernel_2d(cfg.kernel, spatial), stride_2d(cfg.stride, spatial), groups=cin
        )
        self.pointwise = conv_bn_act(cin, cfg.out_channels, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@register_block("factorized")
class FactorizedConv(Block):
    """1xN then Nx1 (Inception-v3): 2N weights per channel pair instead of N^2."""

    @staticmethod
    def has_hidden(cfg: BlockConfig) -> bool:
        return True

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        return [("row.0", "hid", "in"), ("row.1", "hid", None), ("col.0", "out", "hid"), ("col.1", "out", None)]

    def __init__(self, cin: int, cfg: BlockConfig, spatial: str) -> None:
        super().__init__()
        if spatial == "1d":
            raise ValueError("block 'factorized' needs a 2-D input (a 1-D space has no Nx1 axis)")
        mid = hidden_width(cfg, cin)
        k, s = cfg.kernel, cfg.stride
        self.row = conv_bn_act(cin, mid, (1, k), (1, s))
        self.col = conv_bn_act(mid, cfg.out_channels, (k, 1), (s, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.col(self.row(x))


@register_block("mbconv")
class InvertedResidual(Block):
    """MobileNetV2 inverted residual: 1x1 expand, depthwise KxK, 1x1 linear projection."""

    @staticmethod
    def hidden(cfg: BlockConfig, cin: int) -> int:
        return cin * cfg.expansion if cfg.expansion != 1 else cin

    @staticmethod
    def has_hidden(cfg: BlockConfig) -> bool:
        return cfg.expansion != 1

    @staticmethod
    def ties_input(cfg: BlockConfig, cin: int) -> bool:
        return has_residual(cfg, cin)

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        if cfg.expansion != 1:
            return [("body.0.0", "hid", "in"), ("body.0.1", "hid", None), ("body.1.0", "hid", None),
                    ("body.1.1", "hid", None), ("body.2.0", "out", "hid"), ("body.2.1", "out", None)]
        return [("body.0.0", "in", None), ("body.0.1", "in", None), ("body.1.0", "out", "in"), ("body.1.1", "out", None)]

    def __init__(self, cin: int, cfg: BlockConfig, spatial: str) -> None:
        super().__init__()
        mid = hidden_width(cfg, cin)
        layers: list[nn.Module] = []
        if cfg.expansion != 1:
            layers.append(conv_bn_act(cin, mid, (1, 1)))
        layers.append(
            conv_bn_act(mid, mid, kernel_2d(cfg.kernel, spatial), stride_2d(cfg.stride, spatial), groups=mid)
        )
        layers.append(conv_bn_act(mid, cfg.out_channels, (1, 1), act=False))
        self.body = nn.Sequential(*layers)
        self.residual = has_residual(cfg, cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


@register_block("skip")
class Skip(Block):
    """Identity where shapes allow; otherwise the cheapest projection (strided 1x1 conv)."""

    @staticmethod
    def ties_input(cfg: BlockConfig, cin: int) -> bool:
        return has_residual(cfg, cin)

    @staticmethod
    def roles(cfg: BlockConfig, cin: int) -> Roles:
        return [] if has_residual(cfg, cin) else [("proj.0", "out", "in"), ("proj.1", "out", None)]

    def __init__(self, cin: int, cfg: BlockConfig, spatial: str) -> None:
        super().__init__()
        if has_residual(cfg, cin):
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = conv_bn_act(cin, cfg.out_channels, (1, 1), stride_2d(cfg.stride, spatial), act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def create_block(cin: int, cfg: BlockConfig, spatial: str) -> nn.Module:
    try:
        cls = BLOCKS[cfg.type]
    except KeyError:
        raise ValueError(f"unknown block type {cfg.type!r} (allowed: {', '.join(sorted(BLOCKS))})") from None
    return cls(cin, cfg, spatial)


def channel_roles(cfg: BlockConfig, cin: int) -> Roles:
    return BLOCKS[cfg.type].roles(cfg, cin)
