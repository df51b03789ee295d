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

__all__ = [
    "SCHEMA_VERSION",
    "BlockConfig",
    "ArchConfig",
    "CompressionConfig",
    "Recipe",
    "Candidate",
]

SCHEMA_VERSION = 1


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
    """

    type: str
    out_channels: int
    kernel: int = 3
    stride: int = 1
    expansion: int = 1
    stage: int = 0
    hidden: int | None = None


@dataclass(frozen=True)
class ArchConfig:
    """A whole network: stem, body blocks and classifier head."""

    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    spatial: str
    stem_channels: int
    blocks: tuple[BlockConfig, ...]
    head: str = "gap"
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def summary(self) -> str:
        """Compact text, one group per stage: ``stem16 | dsconv k3 w24 x2 /2 | ... | gap``."""
        parts = [f"stem{self.stem_channels}"]
        stages: dict[int, list[BlockConfig]] = {}
        for b in self.blocks:
            stages.setdefault(b.stage, []).append(b)
        for blocks in stages.values():
            b = blocks[0]
            text = b.type if b.type == "skip" else f"{b.type} k{b.kernel}"
            if b.type == "mbconv":
                text += f" e{b.expansion}"
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
        try:
            blocks = tuple(BlockConfig(**b) for b in d["blocks"])
            rest = {k: v for k, v in d.items() if k != "blocks"}
            rest["input_size"] = tuple(rest["input_size"])
            return cls(blocks=blocks, **rest)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"arch: cannot read architecture record ({exc})") from exc


@dataclass(frozen=True)
class CompressionConfig:
    """Compression genes applied after training, in pipeline order.

    The defaults mean "no compression": an fp32 model stored as is.
    """

    quant_bits: int = 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"compression: cannot read compression record ({exc})") from exc


@dataclass(frozen=True)
class Recipe:
    """How a candidate is trained."""

    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4

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

    arch: ArchConfig
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
