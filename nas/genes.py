"""Compression genes: how a method declares its config, and the registry of configs.

In the style of torchao's ``AOBaseConfig`` subclasses: each method's genes are the typed fields
of its own frozen dataclass (a :class:`MethodConfig`), declared with :func:`gene` (default,
check, when it matters, which genes it needs, documentation) and registered with
:func:`register_config`. The built-in methods' configs, and the container a candidate holds
(:class:`~nas.methods.CompressionConfig`), are in :mod:`nas.methods`.

This module imports nothing from ``nas`` and no torch: reading or validating a candidate or a
search space loads no torch. What a method *does* lives in its handler (:mod:`nas.compress`),
registered against its config class; a method of your own is one file holding both (see the
README's "Adding a compression method").

Where a method's ``active``/``summary`` reads another method's genes, it says so in ``reads``
(data, checked at registration), and a gene's ``needs`` names the genes its ``matters`` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from nas.methods import CompressionConfig

__all__ = ["Gene", "gene", "Precision", "PRECISIONS", "MethodConfig", "register_config", "unregister_config", "CONFIGS",
           "owner_of", "field_default", "register_precision", "RESERVED", "genes", "sampling_order", "per_stage_genes"]


@dataclass(frozen=True)
class Gene:
    """One compression gene. ``per_stage``: name of the field holding one value per stage when
    a space samples it per stage. ``matters(genes)``: whether it has any effect given the genes
    sampled so far (those named in ``needs``); a gene that does not matter is not sampled."""

    name: str
    default: Any
    check: Callable[[Any], str | None] | None = None
    per_stage: str | None = None
    needs: tuple[str, ...] = ()
    matters: Callable[[Mapping[str, Any]], bool] | None = None
    doc: str = ""


def gene(default: Any, check: Callable[[Any], str | None] | None = None, *, per_stage: str | None = None,
         needs: tuple[str, ...] = (), matters: Callable[[Mapping[str, Any]], bool] | None = None,
         doc: str = "") -> Any:
    """A gene field of a :class:`MethodConfig` (its name is the field's)."""
    meta = {"check": check, "per_stage": per_stage, "needs": needs, "matters": matters, "doc": doc}
    return dataclasses.field(default=default, metadata={"gene": meta})


@dataclass(frozen=True)
class Precision:
    """What a weight precision is, without its torch codec (:mod:`nas.compress.quantize`
    registers one :class:`~nas.compress.registry.Codec` per entry, with these fields):
    ``kind`` ``float`` or ``int`` (codes in ``[-qmax, qmax]``), ``deploy`` how ONNX Runtime
    runs it (``fp32`` or ``int8``), ``offset``/``halves`` how codes map to stored symbols."""

    name: str
    bits: int
    kind: str
    deploy: str
    qmax: int = 0
    offset: int = 0
    halves: bool = False


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 32, "float", "fp32"),
    Precision("fp16", 16, "float", "fp32"),
    Precision("int8", 8, "int", "int8", qmax=127, offset=127),
    Precision("int4", 4, "int", "int8", qmax=7, offset=7),
    Precision("int2", 2, "int", "int8", qmax=1, offset=1),
    Precision("ternary", 2, "int", "int8", qmax=1, offset=1),
    Precision("binary", 1, "int", "int8", qmax=1, halves=True),
)}


def register_precision(p: Precision) -> Precision:
    """Add a weight precision (the gene checks read this table; its torch codec is registered
    with :func:`nas.compress.registry.register_codec`)."""
    if p.name in PRECISIONS:
        raise ValueError(f"precision {p.name!r} is registered twice")
    if p.kind not in ("float", "int") or p.deploy not in ("fp32", "int8"):
        raise ValueError(f"precision {p.name!r}: kind must be float or int, deploy fp32 or int8")
    PRECISIONS[p.name] = p
    return p


class MethodConfig:
    """Base of a method's frozen config. Subclasses are frozen dataclasses whose fields are the
    method's genes (:func:`gene`) and per-stage values; ``method`` names the handler,
    ``order`` places it among the methods, ``reads`` names the other methods whose genes its
    ``active`` or ``summary`` read."""

    method: ClassVar[str]
    order: ClassVar[int]
    reads: ClassVar[tuple[str, ...]] = ()
    genes: ClassVar[tuple[Gene, ...]] = ()
    registered: ClassVar[bool] = False  # set by register_config (register_method checks it)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # per-stage values may come in as lists (JSON)
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    def active(self, cfg: CompressionConfig) -> bool:
        """Whether the method does anything at ``cfg`` (the whole compression)."""
        return False

    def summary(self, cfg: CompressionConfig) -> str | None:
        """Its one-line text when active."""
        return None


# attributes of nas.methods.CompressionConfig: a gene of that name could not be read by name
RESERVED = frozenset({"summary", "replace", "parts", "precisions", "to_dict", "from_dict", "per_stage",
                      "check_gene", "stage_ratio", "stage_precision"})

CONFIGS: dict[str, type[MethodConfig]] = {}
_OWNER: dict[str, str] = {}  # field (gene or per-stage) -> method


C = TypeVar("C", bound=type[MethodConfig])


def register_config(cls: C) -> C:
    """Register a method's config class: its genes come from its fields; a gene name taken by
    another method, a ``reads`` or ``needs`` naming nothing registered, is an error here."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"{cls.__name__}: a method config is a frozen dataclass")
    name = cls.method
    if name in CONFIGS:
        raise ValueError(f"compression method {name!r} has a config registered twice")
    fields = dataclasses.fields(cls)
    found = tuple(Gene(f.name, f.default, **f.metadata["gene"]) for f in fields if "gene" in f.metadata)
    staged = {g.per_stage for g in found if g.per_stage}
    for f in fields:
        if f.name in _OWNER:
            raise ValueError(f"{cls.__name__}: gene {f.name!r} already belongs to method {_OWNER[f.name]!r}")
        if "gene" not in f.metadata and f.name not in staged:
            raise ValueError(f"{cls.__name__}: field {f.name!r} is neither a gene nor a gene's per-stage values")
    for f in fields:
        if f.name.startswith("_") or f.name in RESERVED:
            raise ValueError(f"{cls.__name__}: {f.name!r} cannot be a gene name (reserved: names starting with '_', "
                             f"{', '.join(sorted(RESERVED))})")
    for g in found:
        if g.per_stage and g.per_stage not in {f.name for f in fields}:
            raise ValueError(f"{cls.__name__}: gene {g.name!r} keeps per-stage values in {g.per_stage!r}, "
                             f"which is not a field of the config")
    own = {g.name for g in found}
    for g in found:
        missing = [n for n in g.needs if n not in _OWNER and n not in own]
        if missing:
            raise ValueError(f"{cls.__name__}: gene {g.name!r} needs {missing}, which no registered method has")
    unknown = [m for m in cls.reads if m not in CONFIGS]
    if unknown:
        raise ValueError(f"{cls.__name__}: reads {unknown}, which are not registered methods")
    cls.genes, cls.registered = found, True
    CONFIGS[name] = cls
    for f in fields:
        _OWNER[f.name] = name
    return cls


def unregister_config(method: str) -> None:
    """Remove a registered method config and its genes (tests, plugins that unload)."""
    cls = CONFIGS.pop(method)
    cls.registered = False
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        _OWNER.pop(f.name, None)


def _ordered() -> list[type[MethodConfig]]:
    return sorted(CONFIGS.values(), key=lambda c: c.order)


def genes() -> dict[str, Gene]:
    """Every registered gene by name, in method order."""
    return {g.name: g for c in _ordered() for g in c.genes}


def per_stage_genes() -> dict[str, str]:
    """Gene -> the field holding its per-stage values, for genes a space may sample per stage."""
    return {name: g.per_stage for name, g in genes().items() if g.per_stage}


def sampling_order(names: list[str]) -> list[str]:
    """``names`` ordered so each gene comes after the genes it ``needs`` (stable otherwise)."""
    known = genes()
    out: list[str] = []
    pending = list(names)
    while pending:
        for n in pending:
            deps = known[n].needs if n in known else ()
            if all(d not in pending or d == n for d in deps):
                out.append(n)
                pending.remove(n)
                break
        else:  # a cycle cannot come from the registry; keep the rest in their order
            out += pending
            break
    return out


def owner_of(field_name: str) -> str | None:
    """The method whose config has this field (a gene or a gene's per-stage values)."""
    return _OWNER.get(field_name)


def field_default(field_name: str) -> Any:
    """The default of a registered config field (tuples as lists, as records store them)."""
    f = CONFIGS[_OWNER[field_name]].__dataclass_fields__[field_name]  # type: ignore[attr-defined]
    return list(f.default) if isinstance(f.default, tuple) else f.default
