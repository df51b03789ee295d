"""``compress(model, cand, ...)``: the registered compression methods, run in order.

Structural methods (prune, low-rank) apply and fine-tune one after another; parametrizing
methods (sparsity masks, fake quantization) share one fine-tuning pass and are then baked;
snapping methods (clustering) come last; then every weight is packed by the plan the active
methods build together. Sharing is structural and happens when the model is built. Which
methods exist, and in which order, is :mod:`nas.compress.registry`'s business.

:func:`final_model` builds the compressed *shape* of a candidate with untrained weights: the
pre-flight measures it, and the packed file loads into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.builder import Net, build
from nas.compress.pack import WeightPlan, pack_state, unpack_state
from nas.compress.quantize import bake_, quantizable_layers
from nas.compress.registry import FIRST_WINS, Method, ordered_methods, register_method
from nas.config import ArchConfig, Candidate, Recipe
from nas.methods import FineTuneConfig
from nas.train import train

if TYPE_CHECKING:
    from nas.config import CompressionConfig

__all__ = ["trained_arch", "structural_arch", "final_model", "trained_model", "extended", "dynamic_latency",
           "method_metrics", "compress", "weight_plans", "pack_model", "load_packed",
           "value_dependent_size", "training_terms", "active_methods", "Context"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@register_method
class FineTune(Method):
    """The fine-tuning budget every method that changes trained weights spends after it."""

    config = FineTuneConfig
    example, effect = {"finetune_epochs": 1}, ()  # a budget the other methods spend


@dataclass
class Context:
    """What a method's ``apply`` may use: the data and recipe to fine-tune with."""

    data: Any
    recipe: Recipe
    seed: int
    epochs: int  # fine-tuning epochs (0 in pre-flight: transformations only)
    loss_fn: LossFn | None = None

    @property
    def training(self) -> bool:
        return self.epochs > 0

    def finetune(self, model: nn.Module, seed_offset: int) -> None:
        if self.epochs > 0:
            train(model, self.data.x_train, self.data.y_train, dataclasses.replace(self.recipe, epochs=self.epochs),
                  self.seed + seed_offset, loss_fn=self.loss_fn, lr_scale=0.3)


def active_methods(cfg: CompressionConfig) -> list[Method]:
    """The methods that do something at ``cfg``, in order. Two of them answering one
    first-wins hook (their ``excludes`` said they never would) is an error, not a silent drop."""
    active = [m for m in ordered_methods() if m.active(cfg)]
    for hook in FIRST_WINS:
        owners = [m.name for m in active if getattr(type(m), hook) is not getattr(Method, hook)]
        if len(owners) > 1:
            raise ValueError(f"compression methods {' and '.join(owners)} are both active and both supply {hook!r} "
                             f"({cfg.summary()}): only one can answer")
    return active


def trained_arch(cand: Candidate) -> ArchConfig:
    """The architecture that is trained (before compression): with sharing, at full width."""
    arch = cand.arch
    for m in active_methods(cand.compression):
        arch = m.build_arch(arch, cand.compression)
    return arch


def structural_arch(cand: Candidate) -> ArchConfig:
    """The architecture after the structural genes (sharing, structured pruning widths)."""
    arch = trained_arch(cand)
    for m in active_methods(cand.compression):
        arch = m.arch(arch, cand.compression)
    return arch


def extended(model: Net, cfg: CompressionConfig) -> Net:
    """``model`` with the modules the active methods add (exit heads)."""
    for m in active_methods(cfg):
        model = m.extend(model, cfg)
    return model


def trained_model(cand: Candidate) -> Net:
    """Untrained model of the shape that is trained (full width, with added modules)."""
    return extended(build(trained_arch(cand)), cand.compression)


def final_model(cand: Candidate) -> Net:
    """Untrained model of the final compressed shape (pruned, shared, factorized)."""
    model = extended(build(structural_arch(cand)), cand.compression)
    for m in active_methods(cand.compression):
        m.restructure(model, cand.compression)
    return model


def dynamic_latency(cfg: CompressionConfig) -> bool:
    """Whether the shipped graph's latency depends on its input (see Method.dynamic_latency)."""
    return any(m.dynamic_latency(cfg) for m in active_methods(cfg))


def method_metrics(model: Net, cfg: CompressionConfig, data: Any) -> dict[str, Any]:
    """The active methods' own figures, measured on the shipped model: ``{"method_metrics":
    {method: {...}}}``, or nothing when no method has any."""
    own = {m.name: f for m in active_methods(cfg) if (f := m.metrics(model, cfg, data))}
    return {"method_metrics": own} if own else {}


def compress(model: Net, cand: Candidate, data, seed: int, loss_fn: LossFn | None = None,  # noqa: ANN001
             finetune: bool = True, max_epochs: int | None = None) -> Net:
    """Apply every active compression method to a trained model, in registry order: structural
    methods (each fine-tunes after itself), then parametrizations (masks, fake quantization)
    with one shared fine-tuning pass, baked into plain weights, then snapping (clustering).

    With ``finetune=False`` only the transformations run (the pre-flight uses this on an
    untrained model to get the exact final shape and packed size without training).
    ``max_epochs`` (``--epochs``) bounds each fine-tuning pass as it bounds training."""
    cfg = cand.compression
    epochs = cfg.finetune_epochs if max_epochs is None else min(cfg.finetune_epochs, max_epochs)
    ctx = Context(data, cand.recipe, seed, epochs if finetune else 0, loss_fn)
    methods = active_methods(cfg)
    for m in (m for m in methods if m.phase == "structural"):
        model = m.apply(model, cfg, ctx)
    parametrized = [m for m in methods if m.phase == "parametrize"]
    for m in parametrized:
        model = m.apply(model, cfg, ctx)
    if any(m.wants_finetune(cfg) for m in parametrized):
        ctx.finetune(model, 202)
    bake_(model)
    for m in (m for m in methods if m.phase == "snap"):
        model = m.apply(model, cfg, ctx)
    return model


def weight_plans(model: Net, cfg: CompressionConfig) -> tuple[dict[str, WeightPlan], str]:
    """Each quantizable weight's storage plan (every active method fills in its part), and the
    codec of the remaining tensors (fp16 when a method allows it, else fp32)."""
    methods = active_methods(cfg)
    plans = {}
    for name, _ in quantizable_layers(model):
        plan = WeightPlan()
        for m in methods:
            plan = m.plan(plan, name, model, cfg)
        plans[f"{name}.weight"] = plan
    return plans, "fp16" if any(m.float_rest(cfg) for m in methods) else "fp32"


def pack_model(model: Net, cfg: CompressionConfig) -> bytes:
    plans, other = weight_plans(model, cfg)
    return pack_state(model.state_dict(), plans, other)


def value_dependent_size(cfg: CompressionConfig) -> bool:
    """Whether the packed size depends on trained values (then checked after compression)."""
    return any(m.value_dependent(cfg) for m in active_methods(cfg))


def training_terms(cfg: CompressionConfig, task: Any, data: Any) -> tuple[LossFn | None, Callable | None]:
    """The training loss (distillation) and penalty (network slimming) the active methods ask for."""
    methods = active_methods(cfg)
    loss = next((f for m in methods if (f := m.loss(cfg, task, data)) is not None), None)
    penalty = next((f for m in methods if (f := m.penalty(cfg)) is not None), None)
    return loss, penalty


def load_packed(cand: Candidate, blob: bytes) -> Net:
    """Decode a packed file into the candidate's final-shape model."""
    model = final_model(cand)
    state = unpack_state(blob)
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    model.load_state_dict(state)
    return model.eval()

