"""The built-in compression methods' configs, and :class:`CompressionConfig`, the container
of one config per registered method that a candidate holds.

A :class:`CompressionConfig` is read either typed (``cfg[PruneConfig].prune_ratio``) or by gene
name (``cfg.prune_ratio``); it is written and stored as one flat ``{gene: value}`` record, so
records from before this layout still load. Torch-free, like :mod:`nas.genes` (how a config is
declared); the handlers that act on these configs are in :mod:`nas.compress`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from nas.errors import ConfigError
from nas.genes import CONFIGS, PRECISIONS, MethodConfig, field_default, gene, genes, owner_of, register_config

__all__ = ["CompressionConfig", "exit_stages", "int_codes", "int8_activations", "IMPORTANCE", "MAX_EXITS",
           "ShareConfig", "FineTuneConfig", "PruneConfig", "LowRankConfig", "SparsityConfig", "QuantConfig",
           "WeightOnlyConfig", "ClusterConfig", "HuffmanConfig", "DistillConfig", "EarlyExitConfig"]

T = TypeVar("T", bound=MethodConfig)


class CompressionConfig:
    """The compression genes of a candidate: one frozen config per registered method (the
    defaults mean "no compression"). Built from gene names (``CompressionConfig(quant="int8",
    prune="l1", prune_ratio=0.5)``); read typed (``cfg[QuantConfig]``) or by gene name
    (``cfg.quant``); immutable, hashable, equal when every gene is."""

    __slots__ = ("_parts",)
    _parts: dict[str, MethodConfig]

    def __init__(self, **values: Any) -> None:
        unknown = [k for k in values if owner_of(k) is None]
        if unknown:
            raise TypeError(f"CompressionConfig() got an unexpected keyword argument {unknown[0]!r}")
        split: dict[str, dict[str, Any]] = {name: {} for name in CONFIGS}
        for k, v in values.items():
            split[owner_of(k)][k] = v  # type: ignore[index]
        object.__setattr__(self, "_parts", {name: CONFIGS[name](**split[name]) for name in CONFIGS})

    def _part(self, method: str) -> MethodConfig:
        part = self._parts.get(method)
        if part is None:  # a method registered after this config was made: its defaults
            part = CONFIGS[method]()
        return part

    def __getitem__(self, kind: type[T]) -> T:
        return self._part(kind.method)  # type: ignore[return-value]

    def parts(self) -> Iterator[MethodConfig]:
        """The configs of the registered methods, in method order."""
        return iter(sorted((self._part(m) for m in CONFIGS), key=lambda p: p.order))

    def __getattr__(self, name: str) -> Any:
        owner = None if name.startswith("_") else owner_of(name)
        if owner is None:
            raise AttributeError(f"CompressionConfig has no gene {name!r}")
        return getattr(self._part(owner), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.to_dict().items())))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.to_dict().items() if v != field_default(k)}
        return "CompressionConfig(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"

    def __reduce__(self) -> tuple:  # pickles (Ray) as its flat record
        return (_from_record, (self.to_dict(),))

    def replace(self, **changes: Any) -> CompressionConfig:
        return CompressionConfig(**{**self.to_dict(), **changes})

    @staticmethod
    def check_gene(name: str, value: Any) -> str | None:
        """Why ``value`` is not allowed for gene ``name`` (``None`` if it is)."""
        g = genes().get(name)
        return g.check(value) if g is not None and g.check is not None else None

    def per_stage(self, name: str, stage: int) -> Any:
        """The value of gene ``name`` for ``stage``: its per-stage value when sampled per stage."""
        field_name = genes()[name].per_stage
        staged = getattr(self, field_name) if field_name else ()
        return staged[min(stage, len(staged) - 1)] if staged else getattr(self, name)

    def stage_ratio(self, stage: int) -> float:
        return self.per_stage("prune_ratio", stage)

    def stage_precision(self, stage: int) -> str:
        return self.per_stage("quant", stage)

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.stage_quant or (self.quant,)

    def summary(self) -> str:
        """Compact text of the genes that are on, e.g. ``prune l1 0.5 | int4 | huffman``."""
        return " | ".join(s for p in self.parts() if p.active(self) and (s := p.summary(self))) or "none"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts():
            for f in dataclasses.fields(p):  # type: ignore[arg-type]
                v = getattr(p, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionConfig:
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"compression: cannot read compression record ({exc})") from exc


def _from_record(record: dict[str, Any]) -> CompressionConfig:
    return CompressionConfig(**record)


# --------------------------------------------------------------------------- gene helpers


def _get(genes_or_cfg: Any) -> Callable[..., Any]:
    if isinstance(genes_or_cfg, Mapping):
        return genes_or_cfg.get
    return lambda k, d=None: getattr(genes_or_cfg, k, d)


def _staged(genes_or_cfg: Any) -> tuple[str, ...]:
    get = _get(genes_or_cfg)
    return tuple(get("stage_quant", ()) or ()) or (get("quant", "fp32"),)


def int_codes(genes_or_cfg: Any) -> list[str]:
    """The precisions of these genes that deploy as int8 codes (int8 down to binary)."""
    return [p for p in _staged(genes_or_cfg) if p in PRECISIONS and PRECISIONS[p].deploy == "int8"]


def int8_activations(genes_or_cfg: Any) -> bool:
    """Whether these genes deploy as int8 QDQ (integer weights without weight_only), which
    the early-exit graph (float) would silently drop."""
    get = _get(genes_or_cfg)
    quant = get("quant", "fp32")
    p = PRECISIONS.get(quant) if isinstance(quant, str) else None
    return bool(p is not None and p.deploy == "int8" and not get("weight_only", False))


MAX_EXITS = 3
IMPORTANCE = ("none", "l1", "bn")


def exit_stages(value: Any) -> tuple[int, ...]:
    """``"1+2"`` -> (1, 2); ``none`` -> ()."""
    text = str(value).strip().lower()
    if text in ("none", "", "0+"):
        return ()
    return tuple(sorted({int(p) for p in text.replace(",", "+").split("+")}))


def _exits_ok(value: Any) -> str | None:
    try:
        stages = exit_stages(value)
    except ValueError:
        return "must be 'none' or stage indices joined by '+' (like '1' or '1+2')"
    if any(s < 0 for s in stages):
        return "stage indices must be >= 0"
    if len(stages) > MAX_EXITS:  # thresholds are calibrated over a grid: len(GRID) ** exits combinations
        return f"at most {MAX_EXITS} exits"
    return None


def _within(low: float, high: float | None = None, what: str = "") -> Callable[[Any], str | None]:
    if high is None:
        return lambda v: None if v >= low else f"must be >= {low:g}"
    return lambda v: None if low <= v <= high else (what or f"must be in [{low:g}, {high:g}]")


# --------------------------------------------------------------------------- the built-in methods


@register_config
@dataclass(frozen=True)
class ShareConfig(MethodConfig):
    method, order = "share", 0
    share: bool = gene(False, doc="blocks of a stage with identical shapes share one set of weights")

    def active(self, cfg: CompressionConfig) -> bool:
        return bool(self.share)

    def summary(self, cfg: CompressionConfig) -> str | None:
        return "share"


@register_config
@dataclass(frozen=True)
class FineTuneConfig(MethodConfig):
    """The fine-tuning budget every method that changes trained weights spends after it."""

    method, order = "finetune", 5
    finetune_epochs: int = gene(2, _within(0), doc="epochs of fine-tuning after each compression step that needs it")


def _pruning(g: Mapping[str, Any]) -> bool:
    return g.get("prune", "none") != "none"


@register_config
@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    method, order = "prune", 10
    prune: str = gene("none", lambda v: None if v in IMPORTANCE else
                      f"is not a pruning method (allowed: {', '.join(IMPORTANCE)})", doc="channel importance: none, l1, bn")
    prune_ratio: float = gene(0.0, _within(0, 0.95), per_stage="stage_prune_ratios", needs=("prune",),
                              matters=_pruning, doc="fraction of channels removed")
    prune_rounds: int = gene(1, _within(1), needs=("prune",), matters=_pruning,
                             doc="iterative prune -> fine-tune rounds")
    prune_multiple: int = gene(1, _within(1), needs=("prune",), matters=_pruning,
                               doc="channels a group keeps are rounded to a multiple of this (4: ONNX Runtime's "
                                   "blocked NCHWc convolutions take multiples of 4; others fall back to NCHW with "
                                   "reorders); 1 = no rounding")
    slimming_l1: float = gene(0.0, _within(0), needs=("prune",), matters=lambda g: g.get("prune") == "bn",
                              doc="L1 penalty on BatchNorm gamma while training")
    stage_prune_ratios: tuple[float, ...] = ()

    def active(self, cfg: CompressionConfig) -> bool:
        return self.prune != "none" and any(r > 0 for r in (self.stage_prune_ratios or (self.prune_ratio,)))

    def summary(self, cfg: CompressionConfig) -> str | None:
        ratio = "/".join(f"{r:g}" for r in self.stage_prune_ratios) or f"{self.prune_ratio:g}"
        return (f"prune {self.prune} {ratio}" + (f" x{self.prune_rounds}" if self.prune_rounds > 1 else "")
                + (f" m{self.prune_multiple}" if self.prune_multiple > 1 else ""))


@register_config
@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    method, order = "lowrank", 20
    lowrank: float = gene(0.0, _within(0, 1), doc="rank ratio for SVD factorization of linear and 1x1 conv layers (0 = off)")

    def active(self, cfg: CompressionConfig) -> bool:
        return self.lowrank > 0

    def summary(self, cfg: CompressionConfig) -> str | None:
        return f"lowrank {self.lowrank:g}"


@register_config
@dataclass(frozen=True)
class SparsityConfig(MethodConfig):
    method, order = "sparsity", 30
    sparsity: float = gene(0.0, _within(0, 0.95), doc="fraction of each dense layer's weights zeroed (size only)")

    def active(self, cfg: CompressionConfig) -> bool:
        return self.sparsity > 0

    def summary(self, cfg: CompressionConfig) -> str | None:
        return f"sparse {self.sparsity:g}"


@register_config
@dataclass(frozen=True)
class ClusterConfig(MethodConfig):
    """k-means weight sharing; the codebook replaces the precision (stored as b-bit indices)."""

    method, order = "cluster", 60
    cluster_bits: int = gene(0, _within(0, 8, "must be 0 (off) to 8"),
                             doc="k-means weight sharing, 2^b values per layer (0 = off)")

    def active(self, cfg: CompressionConfig) -> bool:
        return self.cluster_bits > 0

    def summary(self, cfg: CompressionConfig) -> str | None:
        return f"cluster {self.cluster_bits}b"


def _precision_ok(v: object) -> str | None:
    return None if v in PRECISIONS else f"is not a precision (allowed: {', '.join(PRECISIONS)})"


@register_config
@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    method, order, reads = "quant", 40, ("cluster",)
    quant: str = gene("fp32", _precision_ok, per_stage="stage_quant", needs=("cluster_bits",),
                      matters=lambda g: not g.get("cluster_bits", 0),  # a codebook replaces the precision
                      doc="weight precision")
    stage_quant: tuple[str, ...] = ()

    def active(self, cfg: CompressionConfig) -> bool:
        return not cfg[ClusterConfig].cluster_bits and any(PRECISIONS[p].bits < 32 for p in cfg.precisions)

    def summary(self, cfg: CompressionConfig) -> str | None:
        return "/".join(cfg.precisions) if not cfg[ClusterConfig].cluster_bits and cfg.precisions != ("fp32",) else None


@register_config
@dataclass(frozen=True)
class WeightOnlyConfig(MethodConfig):
    method, order, reads = "weight_only", 45, ("cluster", "quant")
    weight_only: bool = gene(False, needs=("quant", "cluster_bits"),
                             matters=lambda g: bool(int_codes(g)) and not g.get("cluster_bits", 0),
                             doc="integer-coded weights deploy as exact fp32 (no Q/DQ nodes, float activations)")

    def active(self, cfg: CompressionConfig) -> bool:
        return bool(self.weight_only) and not cfg[ClusterConfig].cluster_bits and bool(int_codes(cfg))

    def summary(self, cfg: CompressionConfig) -> str | None:
        return "weight-only"


def _has_codes(g: Mapping[str, Any]) -> bool:
    return bool(g.get("cluster_bits", 0)) or any(PRECISIONS[p].kind == "int" for p in _staged(g))


@register_config
@dataclass(frozen=True)
class HuffmanConfig(MethodConfig):
    method, order = "huffman", 70
    huffman: bool = gene(False, needs=("cluster_bits", "quant"), matters=_has_codes,
                         doc="Huffman-code the stored codes / cluster indices")

    def active(self, cfg: CompressionConfig) -> bool:
        return bool(self.huffman)

    def summary(self, cfg: CompressionConfig) -> str | None:
        return "huffman"


@register_config
@dataclass(frozen=True)
class DistillConfig(MethodConfig):
    method, order = "distill", 80
    distill_alpha: float = gene(0.0, _within(0, 1), doc="weight of the soft-target loss (0 = no distillation)")
    distill_T: float = gene(4.0, lambda v: None if v > 0 else "must be > 0", needs=("distill_alpha",),  # noqa: N815
                            matters=lambda g: g.get("distill_alpha", 0.0) > 0, doc="distillation temperature")

    def active(self, cfg: CompressionConfig) -> bool:
        return self.distill_alpha > 0

    def summary(self, cfg: CompressionConfig) -> str | None:
        return f"kd a{self.distill_alpha:g} T{self.distill_T:g}"


def _has_exits(g: Mapping[str, Any]) -> bool:
    return bool(exit_stages(g.get("early_exit", "none")))


@register_config
@dataclass(frozen=True)
class EarlyExitConfig(MethodConfig):
    method, order = "early_exit", 95
    early_exit: str = gene("none", _exits_ok, needs=("prune", "quant", "weight_only"),
                           matters=lambda g: g.get("prune", "none") in ("none", None) and not int8_activations(g),
                           doc="exit heads after these stages ('1', '1+2'), or none (dynamic computation)")
    exit_loss: float = gene(0.01, _within(0, 1), needs=("early_exit",), matters=_has_exits,
                            doc="validation accuracy the exits may cost against full depth (thresholds calibrated to it)")
    exit_weight: float = gene(0.5, _within(0), needs=("early_exit",), matters=_has_exits,
                              doc="weight of the exits' cross-entropy in the joint training loss")

    def active(self, cfg: CompressionConfig) -> bool:
        return bool(exit_stages(self.early_exit))

    def summary(self, cfg: CompressionConfig) -> str | None:
        return f"early exit after stage {self.early_exit} (<= {self.exit_loss:.1%} val)" if self.active(cfg) else None
