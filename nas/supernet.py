"""A weight-sharing supernet over a search space: train once, score many candidates.

One set of weights covers every architecture a :class:`~nas.space.Space` can sample. Per stage
and per block type there are ``max depth`` blocks of this project's own modules
(:mod:`nas.blocks`), each built at the stage's largest width, kernel and expansion, with the
largest input width any earlier stage (or the stem) can hand it; the stem and the classifier
likewise. A candidate's network (``build(arch)``, exactly what scratch training would build)
takes from them (single-path one-shot over block types; elastic depth, width, kernel and
expansion by slicing, as in Once-for-All):

- channels: the first ``n`` (output and input dimensions alike, hidden widths too);
- kernels: the centre ``k x k`` of the largest kernel (factorized 1xN / Nx1 along their axis);
- depth: the first ``d`` blocks of the stage.

:meth:`SuperNet.forward` runs a candidate on those slices (``torch.func.functional_call`` on
the candidate's own module structure, so gradients reach the shared weights and the forward is
by construction the extracted network's); :meth:`SuperNet.extract` copies them out into a plain
:class:`~nas.builder.Net`. BatchNorm statistics are shared too, so an extracted network's are
re-estimated on training images (:func:`recalibrate_bn`) before it is scored.

Training (:func:`train_supernet`) follows BigNAS: each step trains the largest candidate on the
labels, and the smallest and two random ones on the largest's soft predictions (in-place
distillation); gradients of the four are summed ("sandwich rule"). BigNAS has one block type
per stage; with several, ``sandwich="typed"`` draws each stage's type afresh every step for the
largest and the smallest (``"fixed"``: always the types of most and least capacity, so the
other types' full widths train only when a random candidate takes them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas.blocks import conv_bn_act, create_block, kernel_2d, stride_2d
from nas.builder import Net, build
from nas.config import ArchConfig, BlockConfig
from nas.space import Param, Space

__all__ = ["SuperNet", "Picker", "recalibrate_bn", "train_supernet", "SupernetStats", "BLOCK_CAPACITY", "SANDWICHES"]

# Block types from the most capacity to the least at equal width: the sandwich rule's largest
# candidate takes the first its stage offers, the smallest the last (never leaving a stage out)
BLOCK_CAPACITY = ("mbconv", "conv", "factorized", "dsconv", "skip")

# How the sandwich rule's two ends choose block types: "fixed", the most and least capacity of
# BLOCK_CAPACITY every step (BigNAS's rule, for one block type per stage); "typed", every stage a
# block type drawn per step, at the largest (smallest) depth, width, kernel and expansion, so
# the full width of *every* type's weights trains each step, not only when a random path takes it
SANDWICHES = ("fixed", "typed")


def _largest(p: Param) -> Any:
    return max(p.options())


class Picker:
    """A trial-like object for :meth:`Space.suggest`: every value the largest (``max``), the
    smallest (``min``), or drawn uniformly (``random``, from ``rng``). ``random_types``: with
    ``max`` or ``min``, block types are drawn from ``rng`` (never leaving a stage out)."""

    def __init__(self, policy: str, rng: random.Random | None = None, random_types: bool = False) -> None:
        if policy not in ("max", "min", "random"):
            raise ValueError(f"policy {policy!r} is not one of max, min, random")
        self.policy, self.rng, self.random_types = policy, rng or random.Random(0), random_types
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        if self.policy == "random":
            v = self.rng.choice(choices)
        elif name.endswith(".block") and self.random_types:
            v = self.rng.choice([t for t in choices if t != "skip"] or list(choices))
        elif name.endswith(".block"):
            ranked = [t for t in BLOCK_CAPACITY if t in choices and t != "skip"] or list(choices)
            v = ranked[0] if self.policy == "max" else ranked[-1]
        elif name.endswith("stride") or name == "dropout":
            # the largest candidate downsamples least; neither drops out
            v = min(choices) if self.policy == "max" or name == "dropout" else max(choices)
        elif all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            v = max(choices) if self.policy == "max" else min(choices)
        else:
            v = choices[0]
        self.params[name] = v
        return v

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        big = high if not name.endswith("stride") else low
        v = (self.rng.randrange(low, high + 1, step) if self.policy == "random"
             else big if self.policy == "max" else low + high - big)
        self.params[name] = v
        return v

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        if name == "dropout" and self.policy != "random":
            v = low
        else:
            v = self.rng.uniform(low, high) if self.policy == "random" else high if self.policy == "max" else low
        self.params[name] = v
        return v


def _slice(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The part of a shared tensor a smaller one takes: a prefix along the channel dimensions
    (0 and 1), the centre along the kernel dimensions (2 and on)."""
    if t.shape == shape:
        return t
    if t.dim() != len(shape) or any(s > m for s, m in zip(shape, t.shape)):
        raise ValueError(f"a tensor of shape {tuple(shape)} does not fit in the supernet's {tuple(t.shape)}")
    index = []
    for d, (s, m) in enumerate(zip(shape, t.shape)):
        start = (m - s) // 2 if d >= 2 else 0
        index.append(slice(start, start + s))
    return t[tuple(index)]


class SuperNet(nn.Module):
    """The shared weights of every candidate of ``space`` for inputs of ``in_channels`` x
    ``input_size`` and ``num_classes`` classes."""

    def __init__(self, space: Space, in_channels: int, input_size: tuple[int, int], num_classes: int,
                 kernel_transform: bool = False) -> None:
        super().__init__()
        self.space, self.in_channels = space, in_channels
        self.input_size, self.num_classes = tuple(input_size), num_classes
        spatial = space.spatial
        cin = _largest(space.stem_channels)
        self.stem = conv_bn_act(in_channels, cin, kernel_2d(_largest(space.stem_kernel), spatial),
                                stride_2d(min(space.stem_stride.options()), spatial))
        widest = cin  # the widest input a stage can get: the stem, or any earlier stage
        self.stages = nn.ModuleList()
        for st in space.stages:
            width, kernel, expansion = _largest(st.width), _largest(st.kernel), _largest(st.expansion)
            types = nn.ModuleDict()
            for t in st.block.options():
                if t == "skip":
                    continue  # "skip" in a space leaves the stage out: nothing to hold
                types[t] = nn.ModuleList(
                    create_block(widest if j == 0 else max(widest, width),
                                 BlockConfig(t, width, kernel, 1, expansion), spatial)
                    for j in range(int(_largest(st.depth))))
            self.stages.append(types)
            widest = max(widest, width)
        features = widest
        if "flatten" in space.head.options():
            h, w = self.input_size
            features *= h * w  # an upper bound; a candidate takes its own prefix
        self.classifier = nn.Linear(features, num_classes)
        self._skeletons: dict[ArchConfig, Net] = {}
        # Once-for-All's kernel transformation: a smaller kernel is the centre of the largest
        # times a learned matrix per layer and size (identity at the start), so the small
        # kernel's weights need not be the large kernel's centre as they are
        self.kernel_transform = kernel_transform
        self.transforms = nn.ParameterDict()
        if kernel_transform:
            stem_k = [int(k) for k in space.stem_kernel.options()]
            groups = [("stem.", stem_k)] + [(f"stages.{i}.", [int(k) for k in st.kernel.options()])
                                            for i, st in enumerate(space.stages)]
            for name, w in self.named_parameters():
                if w.dim() != 4 or name.startswith("transforms"):
                    continue
                ks = next((k for prefix, k in groups if name.startswith(prefix)), [])
                for k in ks:
                    sh, sw = (min(k, w.shape[2]), min(k, w.shape[3]))
                    if (sh, sw) != tuple(w.shape[2:]) and (sh > 1 or sw > 1):
                        self.transforms[self._tkey(name, (sh, sw))] = nn.Parameter(torch.eye(sh * sw))

    # ------------------------------------------------------------------ candidates

    def sample(self, policy: str, rng: random.Random | None = None, random_types: bool = False) -> ArchConfig:
        """A candidate architecture: the largest, the smallest, or a random one (``random_types``:
        the largest or smallest dimensions with block types drawn from ``rng``)."""
        return self.space.suggest(Picker(policy, rng, random_types), in_channels=self.in_channels,
                                  input_size=self.input_size, num_classes=self.num_classes).arch

    def _source(self, arch: ArchConfig, name: str) -> str:
        """The supernet tensor a tensor of ``build(arch)`` takes from."""
        head, _, rest = name.partition(".")
        if head != "body":
            return name  # stem.*, classifier.*
        k, _, rest = rest.partition(".")
        b = arch.blocks[int(k)]
        j = sum(1 for c in arch.blocks[: int(k)] if c.stage == b.stage)  # its place in its stage
        if b.stage >= len(self.stages) or b.type not in self.stages[b.stage]:
            raise ValueError(f"block {k} ({b.type} in stage {b.stage}) is not in the supernet's space {self.space.name!r}")
        if b.type == "mbconv" and b.expansion == 1 and int(_largest(self.space.stages[b.stage].expansion)) != 1:
            # no expand layer: its depthwise and projection are the supernet's second and third layers
            part, _, tail = rest.partition(".")
            sub, _, tail = tail.partition(".")
            rest = f"{part}.{int(sub) + 1}.{tail}"
        return f"stages.{b.stage}.{b.type}.{j}.{rest}"

    def _skeleton(self, arch: ArchConfig) -> Net:
        net = self._skeletons.get(arch)
        if net is None:
            with torch.device("meta"):
                net = build(arch)
            if len(self._skeletons) > 256:
                self._skeletons.clear()
            self._skeletons[arch] = net
        return net

    @staticmethod
    def _tkey(name: str, kernel: tuple[int, int]) -> str:
        return f"{name.replace('.', '_')}__{kernel[0]}x{kernel[1]}"

    def tensors(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of ``build(arch)``, as views of the shared tensors (with
        ``kernel_transform``, a smaller kernel is its centre times the layer's learned matrix)."""
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        skeleton = self._skeleton(arch)
        out = {}
        for name, t in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
            source = self._source(arch, name)
            src = own[source]
            out[name] = src if name.endswith("num_batches_tracked") else _slice(src, t.shape)
            tkey = self._tkey(source, tuple(t.shape[2:])) if t.dim() == 4 else ""
            if tkey in self.transforms:  # (none for a kernel of 1: a single tap has nothing to mix)
                w = out[name]
                out[name] = (w.reshape(*w.shape[:2], -1) @ self.transforms[tkey]).reshape(w.shape)
        return out

    def forward(self, x: torch.Tensor, arch: ArchConfig) -> torch.Tensor:  # type: ignore[override]
        """Logits of candidate ``arch`` on the shared weights (its BatchNorms in this module's mode)."""
        skeleton = self._skeleton(arch)
        skeleton.train(self.training)
        return torch.func.functional_call(skeleton, self.tensors(arch), (x,))

    def extract(self, arch: ArchConfig) -> Net:
        """``build(arch)`` holding copies of its shared weights (and BatchNorm statistics)."""
        net = build(arch)
        with torch.no_grad():
            net.load_state_dict({k: v.detach().clone() for k, v in self.tensors(arch).items()})
        return net.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``x`` (a cumulative average
    over its batches), as a network extracted from a supernet needs: the shared statistics
    belong to no candidate in particular."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was = model.training
    model.train()
    for i in range(0, len(x), batch):
        if len(x) - i >= 2 or i == 0:  # a last batch of one sample has no batch statistics
            model(x[i : i + batch])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return model.eval() if not was else model


@dataclass
class SupernetStats:
    epochs: int
    steps: int
    seconds: float
    final_loss: float


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-F.softmax(target, dim=1) * F.log_softmax(logits, dim=1), dim=1).mean()


def train_supernet(net: SuperNet, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.05,
                   batch_size: int = 128, weight_decay: float = 3e-5, seed: int = 0, randoms: int = 2,
                   sandwich: str = SANDWICHES[0],
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   on_epoch: Callable[[int, float], None] | None = None) -> SupernetStats:
    """Train the shared weights with the sandwich rule: per batch the largest candidate on the
    labels, then the smallest and ``randoms`` random ones on the largest's soft predictions
    (in-place distillation); one SGD step on the summed gradients, cosine learning rate.
    ``sandwich``: how the largest and smallest choose block types (:data:`SANDWICHES`)."""
    if sandwich not in SANDWICHES:
        raise ValueError(f"sandwich {sandwich!r} is not one of {', '.join(SANDWICHES)}")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shared = [p for n, p in net.named_parameters() if not n.startswith("transforms.")]
    groups = [{"params": shared}] + ([{"params": list(net.transforms.parameters()), "weight_decay": 0.0}]
                                     if len(net.transforms) else [])  # (decay would pull them off the identity)
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = max(1, len(y) // batch_size)  # whole batches only: BatchNorm needs more than one sample
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps), pct_start=0.1)
    typed = sandwich == "typed"
    largest, smallest = net.sample("max"), net.sample("min")
    layout = torch.channels_last if x.ndim == 4 and x.shape[2] > 1 else torch.contiguous_format
    net.to(memory_format=layout)
    net.train()
    t0, loss_val = time.perf_counter(), float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = x[idx] if augment is None else augment(x[idx], gen)
            xb, yb = xb.contiguous(memory_format=layout), y[idx]
            opt.zero_grad(set_to_none=True)
            if typed:
                largest, smallest = net.sample("max", rng, True), net.sample("min", rng, True)
            logits = net(xb, largest)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            teacher = logits.detach()
            for arch in [smallest, *(net.sample("random", rng) for _ in range(randoms))]:
                _soft_ce(net(xb, arch), teacher).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_val)
    net.to(memory_format=torch.contiguous_format)
    net.eval()
    return SupernetStats(epochs, epochs * steps, time.perf_counter() - t0, loss_val)
