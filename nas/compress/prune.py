"""Structured (channel) pruning that rebuilds a narrower model, and unstructured magnitude
pruning.

Structured pruning works on *channel groups*: the stem's output and each block's output are
interfaces; a residual (identity) block ties its input and output interface into one group,
and blocks that share weights tie their groups too; every hidden width is a group of its
own. Each group keeps its most important channels, by the L1 norm of the filters that produce
them (``l1``) or by |gamma| of their BatchNorms (``bn``, network slimming). The model is then
*rebuilt* from a narrower :class:`ArchConfig` and the kept weights are copied, so shapes,
FLOPs and latency really shrink. How many channels a group keeps depends only on the widths
and ratios, never on weight values, so the final shape is known before training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.blocks import BLOCKS, channel_roles, has_residual, hidden_width
from nas.builder import Net, build, output_size, shared_with
from nas.compress.registry import Method, register_method
from nas.config import ArchConfig
from nas.methods import IMPORTANCE, PruneConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig

__all__ = ["channel_groups", "target_widths", "pruned_arch", "prune_structured", "slimming_penalty", "Prune"]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _role_group(role: str, k: int) -> str:
    return {"in": f"i{k}", "out": f"i{k + 1}", "hid": f"h{k}"}[role]


def _has_hidden(arch: ArchConfig, k: int) -> bool:
    b = arch.blocks[k]
    return BLOCKS[b.type].has_hidden(b)


def channel_groups(arch: ArchConfig) -> tuple[_UnionFind, dict[str, tuple[int, int]]]:
    """Union-find over channel groups, and each raw group's (width, stage)."""
    uf = _UnionFind()
    info: dict[str, tuple[int, int]] = {"i0": (arch.stem_channels, arch.blocks[0].stage if arch.blocks else 0)}
    uf.find("i0")
    cin = arch.stem_channels
    owners = shared_with(arch)
    for k, b in enumerate(arch.blocks):
        info[f"i{k + 1}"] = (b.out_channels, b.stage)
        uf.find(f"i{k + 1}")
        if _has_hidden(arch, k):
            info[f"h{k}"] = (hidden_width(b, cin), b.stage)
            uf.find(f"h{k}")
        if BLOCKS[b.type].ties_input(b, cin):
            uf.union(f"i{k}", f"i{k + 1}")
        j = owners[k]
        if j != k:
            uf.union(f"i{k}", f"i{j}")
            uf.union(f"i{k + 1}", f"i{j + 1}")
            if _has_hidden(arch, k):
                uf.union(f"h{k}", f"h{j}")
        cin = b.out_channels
    return uf, info


def _kept(width: int, keep: float, multiple: int) -> int:
    """``keep`` channels of ``width`` rounded to the nearest of the multiples of ``multiple``
    up to ``width`` and ``width`` itself (ties to the wider): a group is never widened, never
    narrowed where nothing is pruned (ratio 0 keeps a width that is not a multiple), and one
    narrower than a multiple keeps the plain rounding."""
    multiple = int(multiple)
    if multiple <= 1 or width < multiple:
        return max(1, int(round(keep)))
    allowed = [*range(multiple, width + 1, multiple), width]
    return min(allowed, key=lambda w: (abs(w - keep), -w))


def target_widths(arch: ArchConfig, ratios: Sequence[float], fraction: float = 1.0,
                  multiple: int = 1) -> dict[str, int]:
    """Channels each group keeps: round(width * (1 - ratio) ** fraction), at least 1.

    ``ratios`` holds one prune ratio per stage; ``fraction`` < 1 gives the intermediate
    widths of iterative pruning (round j of R uses j/R). ``multiple`` > 1 rounds each kept
    width to a multiple of it instead (see :func:`_kept`): ONNX Runtime's blocked (NCHWc)
    convolutions take channel counts that are multiples of 4 (padded to its 8- or 16-channel
    block); any other count falls back to plain NCHW kernels with reorders around them, and a
    pruned member ran slower than the unpruned one (fm6: 0.10-0.21 ms pruned against 0.037 ms
    whole; ``experiments/prune_alignment.py``)."""
    uf, info = channel_groups(arch)
    out: dict[str, int] = {}
    for g, (width, stage) in info.items():
        root = uf.find(g)
        r = ratios[min(stage, len(ratios) - 1)] if ratios else 0.0
        keep = _kept(width, width * (1.0 - r) ** fraction, multiple)
        out[root] = min(out.get(root, keep), keep)
    return {g: out[uf.find(g)] for g in info}


def pruned_arch(arch: ArchConfig, widths: dict[str, int]) -> ArchConfig:
    """The narrower architecture: explicit widths and explicit residual flags (topology kept)."""
    blocks = []
    cin = arch.stem_channels
    for k, b in enumerate(arch.blocks):
        changes: dict = {"out_channels": widths[f"i{k + 1}"], "residual": has_residual(b, cin)}
        if _has_hidden(arch, k):
            changes["hidden"] = widths[f"h{k}"]
        blocks.append(dataclasses.replace(b, **changes))
        cin = b.out_channels
    return dataclasses.replace(arch, stem_channels=widths["i0"], blocks=tuple(blocks))


def _importance(model: Net, arch: ArchConfig, method: str) -> dict[str, torch.Tensor]:
    """Per raw group, a score per channel (summed over the layers that produce it)."""
    scores: dict[str, torch.Tensor] = {}

    def add(group: str, module: nn.Module) -> None:
        if method == "bn" and isinstance(module, nn.BatchNorm2d):
            s = module.weight.detach().abs()
        elif method == "l1" and isinstance(module, nn.Conv2d):
            w = module.weight.detach().abs()
            s = w.reshape(w.shape[0], -1).sum(1)
            s = s / s.mean().clamp_min(1e-12)
        else:
            return
        scores[group] = scores.get(group, torch.zeros_like(s)) + s

    for sub in model.stem:
        add("i0", sub)
    cin = arch.stem_channels
    for k, b in enumerate(arch.blocks):
        block = model.body[k]
        for name, out_role, _ in channel_roles(b, cin):
            add(_role_group(out_role, k), block.get_submodule(name))
        cin = b.out_channels
    return scores


def _select(model: Net, arch: ArchConfig, widths: dict[str, int], method: str) -> dict[str, torch.Tensor]:
    uf, info = channel_groups(arch)
    raw = _importance(model, arch, method)
    merged: dict[str, torch.Tensor] = {}
    for g in info:
        if g in raw:
            root = uf.find(g)
            merged[root] = merged.get(root, torch.zeros_like(raw[g])) + raw[g]
    keep: dict[str, torch.Tensor] = {}
    for g, (width, _) in info.items():
        root = uf.find(g)
        score = merged.get(root, torch.arange(width, 0, -1, dtype=torch.float32))
        keep[g] = torch.sort(torch.topk(score, widths[g]).indices).values
    return keep


def _copy_conv(old: nn.Conv2d, new: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    w = old.weight.detach()[out_idx]
    if in_idx is not None and old.groups == 1:
        w = w[:, in_idx]
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach()[out_idx])


def _copy_bn(old: nn.BatchNorm2d, new: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(getattr(old, name).detach()[idx])


def _copy(old: nn.Module, new: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    if isinstance(old, nn.Conv2d):
        _copy_conv(old, new, out_idx, in_idx)
    elif isinstance(old, nn.BatchNorm2d):
        _copy_bn(old, new, out_idx)


def prune_structured(model: Net, widths: dict[str, int], method: str) -> Net:
    """A new, narrower model holding ``model``'s most important channels (``l1`` or ``bn``)."""
    if method not in IMPORTANCE[1:]:
        raise ValueError(f"unknown structured pruning importance {method!r} (allowed: {', '.join(IMPORTANCE[1:])})")
    arch = model.arch
    keep = _select(model, arch, widths, method)
    new = build(pruned_arch(arch, widths))
    _copy(model.stem[0], new.stem[0], keep["i0"], None)
    _copy(model.stem[1], new.stem[1], keep["i0"], None)
    cin = arch.stem_channels
    for k, b in enumerate(arch.blocks):
        for name, out_role, in_role in channel_roles(b, cin):
            _copy(model.body[k].get_submodule(name), new.body[k].get_submodule(name),
                  keep[_role_group(out_role, k)], keep[_role_group(in_role, k)] if in_role else None)
        cin = b.out_channels
    last = keep[f"i{len(arch.blocks)}"]
    if arch.head == "flatten":
        h, w = output_size(arch)
        last = (last[:, None] * (h * w) + torch.arange(h * w)[None, :]).reshape(-1)
    new.classifier.weight.data.copy_(model.classifier.weight.detach()[:, last])
    new.classifier.bias.data.copy_(model.classifier.bias.detach())
    return new


def slimming_penalty(model: nn.Module, strength: float) -> torch.Tensor:
    """Network slimming: L1 on every BatchNorm gamma, added to the training loss."""
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return strength * sum(g.abs().sum() for g in gammas) if gammas else torch.zeros(())


@register_method
class Prune(Method):
    """Structured channel pruning (filter L1 norm, or BatchNorm gamma with an optional slimming
    penalty while training) that rebuilds a narrower model, in iterative rounds with fine-tuning."""

    config, phase = PruneConfig, "structural"
    example, effect = {"prune": "l1", "prune_ratio": 0.5}, ("params", "bytes")

    def _ratios(self, arch: ArchConfig, cfg: CompressionConfig) -> list[float]:
        return [cfg.stage_ratio(s) for s in range(max(b.stage for b in arch.blocks) + 1)]

    def arch(self, arch: ArchConfig, cfg: CompressionConfig) -> ArchConfig:
        return pruned_arch(arch, target_widths(arch, self._ratios(arch, cfg), multiple=cfg.prune_multiple))

    def apply(self, model: Any, cfg: CompressionConfig, ctx: Any) -> Any:
        original, ratios = model.arch, self._ratios(model.arch, cfg)
        rounds = cfg.prune_rounds if ctx.training else 1
        for j in range(1, rounds + 1):
            # widths are relative to the original arch; each round narrows the current model
            widths = target_widths(original, ratios, fraction=j / rounds, multiple=cfg.prune_multiple)
            model = prune_structured(model, widths, cfg.prune)
            ctx.finetune(model, j)
        return model

    def penalty(self, cfg: CompressionConfig) -> Callable[[Any], Any] | None:
        if cfg.prune == "bn" and cfg.slimming_l1 > 0:
            return lambda m: slimming_penalty(m, cfg.slimming_l1)
        return None
