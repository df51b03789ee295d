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
    "CompressionConfig",  # noqa: F822 - made on first use (PEP 562 __getattr__ below)
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
    stem_kernel: int = 3
    stem_stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def summary(self) -> str:
        """Compact text, one group per stage: ``stem16 | dsconv k3 w24 x2 /2 | ... | gap``."""
        parts = [f"stem{self.stem_channels}" + (f" k{self.stem_kernel}" if self.stem_kernel != 3 else "")
                 + (f" /{self.stem_stride}" if self.stem_stride > 1 else "")]
        stages: dict[int, list[BlockConfig]] = {}
        for b in self.blocks:
            stages.setdefault(b.stage, []).append(b)
        for blocks in stages.values():
            b = blocks[0]
            from nas.blocks import BLOCKS

            cls = BLOCKS[b.type]
            text = (f"{b.type} k{b.kernel}" if cls.summary_kernel else b.type) + cls.label(b)
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


class _CompressionMethods:
    """Behaviour of :class:`CompressionConfig` (its fields come from the registry)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # per-stage values may come in as lists (JSON)
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    @staticmethod
    def check_gene(name: str, value: Any) -> str | None:
        """Why ``value`` is not allowed for gene ``name`` (``None`` if it is)."""
        from nas.compress.registry import genes

        gene = genes().get(name)
        return gene.check(value) if gene is not None and gene.check is not None else None

    def per_stage(self, gene: str, stage: int) -> Any:
        """The value of ``gene`` for ``stage``: its per-stage value when sampled per stage."""
        from nas.compress.registry import genes

        field_name = genes()[gene].per_stage
        staged = getattr(self, field_name) if field_name else ()
        return staged[min(stage, len(staged) - 1)] if staged else getattr(self, gene)

    def stage_ratio(self, stage: int) -> float:
        return self.per_stage("prune_ratio", stage)

    def stage_precision(self, stage: int) -> str:
        return self.per_stage("quant", stage)

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.stage_quant or (self.quant,)

    def summary(self) -> str:
        """Compact text of the genes that are on, e.g. ``prune l1 0.5 | int4 | huffman``."""
        from nas.compress.registry import ordered_methods

        return " | ".join(p for m in ordered_methods() if m.active(self) and (p := m.summary(self))) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        try:
            return cls(**dict(d))
        except TypeError as exc:
            raise ConfigError(f"compression: cannot read compression record ({exc})") from exc


_COMPRESSION: type | None = None


def _compression_class() -> type:
    """``CompressionConfig``: a frozen dataclass whose fields are the registered methods'
    genes (:mod:`nas.compress.registry`), built on first use so that a new method's module
    adds its genes without touching this file."""
    global _COMPRESSION
    if _COMPRESSION is None:
        from nas.compress.registry import genes

        known = genes()
        fields = [(g.name, type(g.default).__name__, dataclasses.field(default=g.default)) for g in known.values()]
        fields += [(g.per_stage, "tuple", dataclasses.field(default=())) for g in known.values() if g.per_stage]
        cls = dataclasses.make_dataclass("CompressionConfig", fields, bases=(_CompressionMethods,), frozen=True)
        cls.__module__ = __name__  # pickles (Ray) find it as nas.config.CompressionConfig
        cls.__doc__ = ("Compression genes, one field per gene of the registered methods; the defaults mean "
                       "\"no compression\". Fields: " + ", ".join(f"{g.name} ({g.doc})" if g.doc else g.name
                                                                   for g in known.values()))
        _COMPRESSION = cls
    return _COMPRESSION


def __getattr__(name: str) -> Any:  # PEP 562: CompressionConfig is made on first use
    if name == "CompressionConfig":
        return _compression_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    arch: ArchConfig
    compression: CompressionConfig = field(default_factory=lambda: _compression_class()())  # noqa: F821
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
            compression=_compression_class().from_dict(d.get("compression", {})),
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
