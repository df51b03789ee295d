"""Frozen configuration records that describe a candidate completely.

A :class:`Candidate` is what a search samples and what a bundle stores: rebuilding a model
from the same candidate JSON gives the same module structure. Everything round-trips
through plain dicts (and so JSON) with a schema version.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nas.errors import ConfigError
from nas.methods import CompressionConfig

__all__ = [
    "SCHEMA_VERSION",
    "BlockType",
    "BLOCK_TYPES",
    "BlockConfig",
    "ArchConfig",
    "CompressionConfig",
    "Recipe",
    "Candidate",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BlockType:
    """What records and spaces know of a block type, torch-free (:mod:`nas.blocks` registers
    the module that builds it): whether the summary shows its kernel and expansion, and
    whether it needs a 2-D input."""

    name: str
    shows_kernel: bool = True
    shows_expansion: bool = False
    needs_2d: bool = False


# the built-in block types; nas.blocks.register_block adds one for a block of your own
BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("conv"), BlockType("dsconv"), BlockType("factorized", needs_2d=True),
    BlockType("mbconv", shows_expansion=True), BlockType("skip", shows_kernel=False))}


@dataclass(frozen=True)
class BlockConfig:
    """One block of the network body.

    Attributes:
        type: a name in the block registry (``conv``, ``dsconv``, ``factorized``, ``mbconv``,
            ``skip``).
        out_channels: channels this block produces.
        kernel: kernel length N; 2-D spaces use NxN (or 1xN then Nx1), 1-D spaces use 1xN.
        stride: spatial stride of the block (applied along the signal axis in 1-D spaces).
        expansion: expansion ratio of an inverted residual's hidden layer.
        stage: index of the stage the block belongs to (used by per-stage compression).
        hidden: explicit hidden width (set by structured pruning); ``None`` means derived.
        residual: explicit residual/identity flag (set by structured pruning, so that a
            narrowed block keeps its topology); ``None`` means derived from the shapes.
    """

    type: str
    out_channels: int
    kernel: int = 3
    stride: int = 1
    expansion: int = 1
    stage: int = 0
    hidden: int | None = None
    residual: bool | None = None


@dataclass(frozen=True)
class ArchConfig:
    """A whole network: stem, body blocks and classifier head."""

    # the defaults are the smallest network for 8x8 digits (a stem and the head), so that
    # ``Candidate()`` is a valid record
    in_channels: int = 1
    num_classes: int = 10
    input_size: tuple[int, int] = (8, 8)
    spatial: str = "2d"
    stem_channels: int = 8
    blocks: tuple[BlockConfig, ...] = ()
    head: str = "gap"
    dropout: float = 0.0
    share: bool = False  # blocks of a stage with identical shapes share one set of weights
    stem_kernel: int = 3
    stem_stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def stage_of(self, layer: str) -> int:
        """The stage a module of the built network belongs to (``body.3...``: its block's;
        the stem goes with the first block's stage, the head with the last's)."""
        if layer.startswith("body."):
            return self.blocks[int(layer.split(".")[1])].stage
        if layer.startswith("stem"):
            return self.blocks[0].stage if self.blocks else 0
        return self.blocks[-1].stage if self.blocks else 0

    def summary(self) -> str:
        """Compact text, one group per stage: ``stem16 | dsconv k3 w24 x2 /2 | ... | gap``."""
        parts = [f"stem{self.stem_channels}" + (f" k{self.stem_kernel}" if self.stem_kernel != 3 else "")
                 + (f" /{self.stem_stride}" if self.stem_stride > 1 else "")]
        stages: dict[int, list[BlockConfig]] = {}
        for b in self.blocks:
            stages.setdefault(b.stage, []).append(b)
        for blocks in stages.values():
            b = blocks[0]
            kind = BLOCK_TYPES.get(b.type, BlockType(b.type))
            text = (f"{b.type} k{b.kernel}" if kind.shows_kernel else b.type)
            text += f" e{b.expansion}" if kind.shows_expansion else ""
            text += f" w{b.out_channels}"
            if len(blocks) > 1:
                text += f" x{len(blocks)}"
            if b.stride > 1:
                text += f" /{b.stride}"
            parts.append(text)
        parts.append(self.head)
        return " | ".join(parts)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        # a record names the whole network: the defaults are for ArchConfig() in code only
        missing = [k for k in ("in_channels", "num_classes", "input_size", "spatial", "stem_channels", "blocks")
                   if k not in d]
        if missing:
            raise ConfigError(f"arch: cannot read architecture record (missing {', '.join(missing)})")
        try:
            blocks = tuple(BlockConfig(**b) for b in d["blocks"])
            rest = {k: v for k, v in d.items() if k != "blocks"}
            rest["input_size"] = tuple(rest["input_size"])
            return cls(blocks=blocks, **rest)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"arch: cannot read architecture record ({exc})") from exc


AUGMENTS = ("none", "shift", "affine")


def augments_for(spatial: str) -> tuple[str, ...]:
    """The augmentations that make sense for ``1d`` or ``2d`` inputs (affine rotates a plane)."""
    return AUGMENTS if spatial == "2d" else ("none", "shift")


@dataclass(frozen=True)
class Recipe:
    """How a candidate is trained."""

    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    # Training-time augmentation of each batch (the stored data is unchanged): "shift" moves
    # each sample by up to 1/8 of its width and height, "affine" also rotates by up to 10
    # degrees and scales by 0.9-1.1 (2-D inputs only). See nas.train.augment.
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ConfigError(f"recipe: augment {self.augment!r} is not one of {', '.join(AUGMENTS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"recipe: cannot read training recipe ({exc})") from exc


@dataclass(frozen=True)
class Candidate:
    """Architecture + compression + training recipe: one point of the search space."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    recipe: Recipe = field(default_factory=Recipe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "arch": self.arch.to_dict(),
            "compression": self.compression.to_dict(),
            "recipe": self.recipe.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"candidate: schema version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        return cls(
            arch=ArchConfig.from_dict(d["arch"]),
            compression=CompressionConfig.from_dict(d.get("compression", {})),
            recipe=Recipe.from_dict(d.get("recipe", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"candidate: not valid JSON ({exc})") from exc
