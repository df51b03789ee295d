"""Training and evaluation loops with an epoch budget."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.config import Recipe
from nas.errors import TrialFailure

__all__ = ["seed_everything", "train", "augment", "accuracy", "predict", "TrainStats"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainStats:
    epochs: int
    final_loss: float
    seconds: float


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[int, nn.Module], None]


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A random geometric transform per sample of the batch ``x`` (N, C, H, W).

    ``shift``: translation by up to 1/8 of the width (and height, for 2-D inputs), sub-pixel,
    drawn for each sample;
    ``affine``: the same plus rotation by up to 10 degrees and scale 0.9-1.1. Pixels that come
    from outside the sample repeat its border (``padding_mode="border"``), so a normalized
    background stays background. One ``affine_grid`` + ``grid_sample`` call per batch
    (torchvision's RandomAffine transforms one image at a time, which would cost more than the
    small networks searched here train in).
    """
    if kind == "none":
        return x
    n, h = x.shape[0], x.shape[2]
    tx = (torch.rand(n, generator=gen) * 2 - 1) * 0.25  # grid units: 2 = the whole width, so 1/8 of it
    ty = torch.zeros(n) if h == 1 else (torch.rand(n, generator=gen) * 2 - 1) * 0.25
    if kind == "affine" and h > 1:
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
        scale = 0.9 + torch.rand(n, generator=gen) * 0.2
    else:
        angle, scale = torch.zeros(n), torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # the grid is in normalized units (-1..1 along each side): a rotation in pixels becomes
    # [[c, -s*H/W], [s*W/H, c]] there, or non-square inputs would be sheared
    w = x.shape[3]
    theta = torch.stack([torch.stack([cos, -sin * h / w, tx], 1), torch.stack([sin * w / h, cos, ty], 1)], 1)
    # (the draws come from the CPU generator, one seeded stream whatever the device; the
    # transform runs where the batch is)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    seed: int,
    *,
    epochs: int | None = None,
    start_epoch: int = 0,
    loss_fn: LossFn | None = None,
    on_epoch: EpochHook | None = None,
    lr_scale: float = 1.0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``epochs`` (default: the recipe's) with AdamW + cosine LR.

    ``loss_fn(logits, targets, inputs)`` replaces cross-entropy (distillation uses it).
    ``penalty(model)`` is added to the loss (network slimming's L1 on BatchNorm gamma).
    A model with an ``auxiliary_loss(targets)`` method (exit heads) adds that term after each forward.
    ``on_epoch(epoch, model)`` runs after each epoch and may raise to stop training early.
    A non-finite loss raises :class:`TrialFailure`.
    """
    from nas.device import autocast_dtype, placement

    where = placement()  # the trial's device (nas.device.on_device); the CPU by default
    device = torch.device(where.device)
    amp_dtype = autocast_dtype(where.device) if where.amp else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if device.type != "cpu":  # the data moves once per training run; batches are cut on the device
        model.to(device)
        x, y = x.to(device), y.to(device)
    n_epochs = recipe.epochs if epochs is None else epochs
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr * lr_scale, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(y) / recipe.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr * lr_scale, total_steps=max(1, n_epochs * steps_per_epoch), pct_start=0.15
    )
    t0 = time.perf_counter()
    loss_val = float("nan")
    # 2-D images train in channels-last memory: oneDNN's depthwise and small convolutions run
    # ~1.9x faster that way on CPU (a 28x28 default28 candidate: 30 steps 2.96 s -> 1.53 s);
    # the weights go back to the standard layout afterwards, so nothing downstream sees it
    layout = torch.channels_last if x.ndim == 4 and x.shape[2] > 1 else torch.contiguous_format
    model.to(memory_format=layout)
    model.train()
    for epoch in range(n_epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb, yb = augment(x[idx], recipe.augment, gen).contiguous(memory_format=layout), y[idx]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(xb)
                loss = loss_fn(logits, yb, xb) if loss_fn is not None else F.cross_entropy(logits, yb)
                if penalty is not None:
                    loss = loss + penalty(model)
                aux = getattr(model, "auxiliary_loss", None)  # deep supervision: heads inside the network
                if aux is not None:
                    loss = loss + aux(yb)
            if not torch.isfinite(loss):
                raise TrialFailure(f"non-finite loss ({loss.item()}) at epoch {start_epoch + epoch + 1}, step {i + 1}")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:  # float16: scaled gradients, steps skipped on overflow
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            loss_val = loss.item()
        if on_epoch is not None:
            model.eval()
            on_epoch(start_epoch + epoch + 1, model)
            model.train()
    model.to(memory_format=torch.contiguous_format)
    if device.type != "cpu":
        model.to("cpu")  # packing, export and measurement read CPU weights
    model.eval()
    return TrainStats(n_epochs, loss_val, time.perf_counter() - t0)



@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits of ``x`` in batches, computed where the model is (its first parameter's device), returned on the CPU."""
    model.eval()
    p = next(model.parameters(), None)
    dev = p.device if p is not None else x.device
    return torch.cat([model(x[i : i + batch].to(dev)).cpu() for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``, exactly (a float32 mean rounds 632/645 up, and a
    baseline scored that way outranked a candidate with the same count)."""
    return int((predict(model, x).argmax(1) == y).sum()) / len(y)
