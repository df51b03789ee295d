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

    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    spatial: str
    stem_channels: int
    blocks: tuple[BlockConfig, ...]
    head: str = "gap"
    dropout: float = 0.0
    share: bool = False  # blocks of a stage with identical shapes share one set of weights

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


QUANT_MODES = ("fp32", "fp16", "int8", "int4", "int2", "ternary", "binary")
PRUNE_METHODS = ("none", "l1", "bn")


@dataclass(frozen=True)
class CompressionConfig:
    """Compression genes, applied in pipeline order: prune -> fine-tune -> low-rank / share ->
    sparsify + quantize (QAT) / cluster -> encode. The defaults mean "no compression".

    Attributes:
        prune: structured channel pruning importance: ``none``, ``l1`` (filter L1 norm) or
            ``bn`` (BatchNorm |gamma|, network slimming).
        prune_ratio: fraction of channels removed (global); ``stage_prune_ratios`` overrides
            it per stage when given.
        prune_rounds: iterative prune -> fine-tune rounds.
        slimming_l1: L1 penalty on BatchNorm gamma while training (network slimming).
        finetune_epochs: epochs of fine-tuning after each compression step that needs it.
        sparsity: unstructured magnitude pruning: fraction of each layer's weights zeroed.
        quant: weight precision: fp32, fp16, int8, int4, int2, ternary, binary;
            ``stage_quant`` overrides it per stage (mixed precision).
        cluster_bits: k-means weight clustering to 2^b shared values per layer (0 = off);
            replaces ``quant`` for how weights are stored.
        huffman: Huffman-code the stored weight codes / cluster indices.
        lowrank: rank ratio for SVD factorization of linear and 1x1 conv layers (0 = off).
        share: blocks of a stage with identical shapes share one set of weights.
        distill_alpha: weight of the soft-target loss (0 = no distillation).
        distill_T: distillation temperature.
    """

    prune: str = "none"
    prune_ratio: float = 0.0
    stage_prune_ratios: tuple[float, ...] = ()
    prune_rounds: int = 1
    slimming_l1: float = 0.0
    finetune_epochs: int = 2
    sparsity: float = 0.0
    quant: str = "fp32"
    stage_quant: tuple[str, ...] = ()
    cluster_bits: int = 0
    huffman: bool = False
    lowrank: float = 0.0
    share: bool = False
    distill_alpha: float = 0.0
    distill_T: float = 4.0

    @staticmethod
    def check_gene(name: str, value: Any) -> str | None:
        """Why ``value`` is not allowed for gene ``name`` (``None`` if it is)."""
        if name == "prune" and value not in PRUNE_METHODS:
            return f"is not a pruning method (allowed: {', '.join(PRUNE_METHODS)})"
        if name == "quant" and value not in QUANT_MODES:
            return f"is not a precision (allowed: {', '.join(QUANT_MODES)})"
        if name in ("prune_ratio", "sparsity") and not 0 <= value <= 0.95:
            return "must be in [0, 0.95]"
        if name in ("lowrank", "distill_alpha") and not 0 <= value <= 1:
            return "must be in [0, 1]"
        if name == "cluster_bits" and not 0 <= value <= 8:
            return "must be 0 (off) to 8"
        if name in ("prune_rounds",) and value < 1:
            return "must be >= 1"
        if name in ("finetune_epochs",) and value < 0:
            return "must be >= 0"
        if name in ("slimming_l1",) and value < 0:
            return "must be >= 0"
        if name == "distill_T" and value <= 0:
            return "must be > 0"
        return None

    def stage_ratio(self, stage: int) -> float:
        if self.stage_prune_ratios:
            return self.stage_prune_ratios[min(stage, len(self.stage_prune_ratios) - 1)]
        return self.prune_ratio

    def stage_precision(self, stage: int) -> str:
        if self.stage_quant:
            return self.stage_quant[min(stage, len(self.stage_quant) - 1)]
        return self.quant

    def summary(self) -> str:
        """Compact text of the genes that are on, e.g. ``prune l1 0.5 | int4 | huffman``."""
        parts = []
        if self.prune != "none" and any(r > 0 for r in (self.stage_prune_ratios or (self.prune_ratio,))):
            ratio = "/".join(f"{r:g}" for r in self.stage_prune_ratios) or f"{self.prune_ratio:g}"
            parts.append(f"prune {self.prune} {ratio}" + (f" x{self.prune_rounds}" if self.prune_rounds > 1 else ""))
        if self.lowrank > 0:
            parts.append(f"lowrank {self.lowrank:g}")
        if self.share:
            parts.append("share")
        if self.sparsity > 0:
            parts.append(f"sparse {self.sparsity:g}")
        if self.cluster_bits:
            parts.append(f"cluster {self.cluster_bits}b")
        elif self.precisions != ("fp32",):
            parts.append("/".join(self.precisions))
        if self.huffman:
            parts.append("huffman")
        if self.distill_alpha > 0:
            parts.append(f"kd a{self.distill_alpha:g} T{self.distill_T:g}")
        return " | ".join(parts) or "none"

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.stage_quant or (self.quant,)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stage_prune_ratios"] = list(self.stage_prune_ratios)
        d["stage_quant"] = list(self.stage_quant)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        try:
            d = dict(d)
            for k in ("stage_prune_ratios", "stage_quant"):
                d[k] = tuple(d.get(k, ()))
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
