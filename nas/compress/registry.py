"""The compression registry: one module per method, one registered codec per precision.

In the style of torchao's config -> handler pairs and timm's registries. A method's genes are
its frozen config class (:mod:`nas.genes`, torch-free); its handler is a :class:`Method`
subclass naming that class (``config = PruneConfig``), registered with
:func:`register_method`, and owns what it does at every step of a trial:

====================  ==========================================================================
``build_arch``        its effect on the architecture that is trained (sharing)
``extend``            modules it adds to the network, trained and shipped (exit heads)
``arch``              its effect on the final shape measured in pre-flight (pruned widths)
``restructure``       structural change of a built model before weights exist (factorized layers)
``apply``             what it does to a trained model (phase ``structural``, ``parametrize`` or
                      ``snap``; structural methods fine-tune themselves, parametrizations share
                      one fine-tuning pass before they are baked)
``plan``              its part of each weight's storage plan in the packed file
``float_deploy``      whether its weights can only deploy as float (and the label saying so)
``value_dependent``   whether its packed size depends on trained values (checked after training)
``loss`` / ``penalty`` training-time terms (distillation, network slimming); a network that
                      ``extend`` gave an ``auxiliary_loss(targets)`` gets that term too
``deploy``            writes the deployable ONNX graph itself (control flow the exporter
                      cannot trace), returning its precision's label and exporter
``dynamic_latency``   whether latency depends on the input: then it is the mean over the
                      validation inputs at batch 1, with the 95th percentile beside it
``metrics``           figures measured on the shipped model, recorded with the trial
``active`` / ``summary`` whether it is on and its one-line text (its config's, by default)
``card_notes``        limits the model card states; ``card_lines`` what it says of the metrics
====================  ==========================================================================

:func:`nas.compress.passes.compress` runs the registered methods in ``order``. A precision is
a :class:`Codec` (bits, integer codes or float, how it deploys) registered with
:func:`register_codec`; quantization, packing, deployment and the model card all read it.
This module imports nothing from ``nas``; ``nas/compress/__init__.py`` imports every built-in
method's module by name, which registers them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # types only: this module imports nothing from nas (a leaf under every method)
    import torch

    from nas.compress.pack import WeightPlan
    from nas.config import ArchConfig
    from nas.genes import Gene, MethodConfig
    from nas.methods import CompressionConfig

__all__ = ["Method", "Codec", "METHODS", "CODECS", "FIRST_WINS", "register_method", "unregister_method", "register_codec",
           "ordered_methods"]

PHASES = ("structural", "parametrize", "snap", "none")
# hooks where only one active method can answer: two methods supplying one of them must
# declare that they are never active together (``excludes``), or registration fails
FIRST_WINS = ("loss", "penalty", "deploy", "float_deploy")


class Method:
    """Base handler: every hook is a no-op; a method overrides the ones it owns."""

    config: ClassVar[type[MethodConfig]]  # its genes (nas.genes); name and order come from it
    name: ClassVar[str]
    order: ClassVar[int]
    phase: ClassVar[str] = "none"
    genes: ClassVar[tuple[Gene, ...]] = ()
    # methods never active together with this one (their genes exclude each other), so both
    # may supply a FIRST_WINS hook
    excludes: ClassVar[tuple[str, ...]] = ()
    # Genes that switch it on in a test, and what it should then cut against the same genes
    # with its own off: "params", "bytes" (of the packed file), "latency", or "loss" (a
    # training term). The registry tests check every method against its declaration.
    example: ClassVar[dict[str, Any]] = {}
    effect: ClassVar[tuple[str, ...]] = ()

    def active(self, cfg: CompressionConfig) -> bool:
        return cfg[self.config].active(cfg)

    def build_arch(self, arch: ArchConfig, cfg: CompressionConfig) -> ArchConfig:
        """Its effect on the model that is trained (sharing ties blocks from the start)."""
        return arch

    def extend(self, model: torch.nn.Module, cfg: CompressionConfig) -> torch.nn.Module:
        """Modules it adds to a built network (before training, and to the final shape the
        packed file loads into); may return a new module wrapping ``model``."""
        return model

    def arch(self, arch: ArchConfig, cfg: CompressionConfig) -> ArchConfig:
        """Its effect on the final, shipped shape (pruned widths)."""
        return arch

    def restructure(self, model: torch.nn.Module, cfg: CompressionConfig) -> None:
        return None

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        return model

    def wants_finetune(self, cfg: CompressionConfig) -> bool:
        return False

    def plan(self, plan: WeightPlan, layer: str, model: Any, cfg: CompressionConfig) -> WeightPlan:
        return plan

    def float_rest(self, cfg: CompressionConfig) -> bool:
        """Whether the tensors without a plan (BatchNorm, biases) may be stored as fp16."""
        return False

    def float_deploy(self, cfg: CompressionConfig) -> str | None:
        return None

    def deploy(self, model: torch.nn.Module, cfg: CompressionConfig, example: torch.Tensor,
               path: Any) -> tuple[str, str] | None:
        """Write the deployable ONNX graph to ``path`` itself and return (the deployed
        precision's label, the exporter that traced it), or ``None`` to leave it to the
        exporter and quantizer."""
        return None

    def dynamic_latency(self, cfg: CompressionConfig) -> bool:
        """Whether the shipped graph's latency depends on the input (control flow)."""
        return False

    def metrics(self, model: torch.nn.Module, cfg: CompressionConfig, data: Any) -> dict[str, Any]:
        """Figures measured on the shipped model (validation split), recorded with the trial."""
        return {}

    def value_dependent(self, cfg: CompressionConfig) -> bool:
        return False

    def loss(self, cfg: CompressionConfig, task: Any, data: Any) -> Callable | None:
        return None

    def penalty(self, cfg: CompressionConfig) -> Callable | None:
        return None

    def summary(self, cfg: CompressionConfig) -> str | None:
        return cfg[self.config].summary(cfg)

    def card_notes(self, cfg: CompressionConfig) -> list[str]:
        return []

    def card_lines(self, cfg: CompressionConfig, metrics: Mapping[str, Any]) -> list[str]:
        """What the model card says of this method's recorded ``metrics``."""
        return []


@dataclass(frozen=True)
class Codec:
    """A weight precision. ``kind`` is ``float`` (values stored as fp32/fp16) or ``int`` (integer
    codes in ``[-qmax, qmax]`` with one fp32 scale per output channel); ``deploy`` is how ONNX
    Runtime runs it (``fp32`` or ``int8``). ``encode(w) -> (codes, scale)`` and ``fake(w)``
    (quantize-dequantize) are the codec's own; ``symbols``/``codes`` map codes to the unsigned
    symbols the packed file stores and back."""

    name: str
    bits: int
    kind: str
    deploy: str
    qmax: int = 0
    encode: Callable[[Any], tuple[Any, Any]] | None = None
    fake: Callable[[Any], Any] | None = None
    offset: int = 0  # symbol = code + offset (binary: (code + 1) / 2, see below)
    halves: bool = False  # binary: codes {-1, 1} stored as one bit

    def symbols(self, codes: Any) -> Any:
        return (codes + 1) // 2 if self.halves else codes + self.offset

    def codes(self, symbols: Any) -> Any:
        return symbols * 2 - 1 if self.halves else symbols - self.offset


METHODS: dict[str, Method] = {}
CODECS: dict[str, Codec] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a handler against its config class (``cls.config``, registered with
    :func:`nas.genes.register_config`). A second method supplying a :data:`FIRST_WINS` hook
    is an error unless one of the two ``excludes`` the other."""
    config = getattr(cls, "config", None)
    if config is None or not getattr(config, "registered", False):
        raise ValueError(f"{cls.__name__}: a compression method names its config class (config = ...Config), "
                         "registered with nas.genes.register_config first")
    cls.name, cls.order, cls.genes = config.method, config.order, config.genes
    if cls.name in METHODS:
        raise ValueError(f"compression method {cls.name!r} is registered twice")
    if cls.phase not in PHASES:
        raise ValueError(f"{cls.name}: phase {cls.phase!r} is not one of {PHASES}")
    unknown = [m for m in cls.excludes if m not in METHODS]
    if unknown:
        raise ValueError(f"{cls.name}: excludes {unknown}, which are not registered methods")
    for hook in FIRST_WINS:
        if getattr(cls, hook) is getattr(Method, hook):
            continue
        for other in METHODS.values():
            if getattr(type(other), hook) is not getattr(Method, hook) and not (
                    other.name in cls.excludes or cls.name in other.excludes):
                raise ValueError(f"compression methods {other.name!r} and {cls.name!r} both supply {hook!r}; only "
                                 f"one can answer: declare excludes=({other.name!r},) if they are never active together")
    METHODS[cls.name] = cls()
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered handler (tests, plugins that unload); its config stays registered."""
    METHODS.pop(name)


def register_codec(codec: Codec) -> Codec:
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is registered twice")
    CODECS[codec.name] = codec
    return codec


def ordered_methods() -> list[Method]:
    """The registered methods in their order (importing :mod:`nas.compress` registers them)."""
    return sorted(METHODS.values(), key=lambda m: m.order)
