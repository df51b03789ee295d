"""Knowledge distillation (Hinton et al.): soft targets at temperature T, weighted with the
hard labels; the soft term is scaled by T^2 so its gradients keep their size as T changes.

Teachers are trained once per study and cached as files in the study's own artifacts folder,
named by a digest of the training data's content and the teacher's recipe (architecture,
epochs, seed): a cached teacher is only ever reused for the same data and recipe. A file lock
stops two workers training the same teacher; an ensemble averages the teachers' softened
probabilities. Without an artifacts folder, teachers are kept in memory for the process only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nas.builder import build
from nas.compress.registry import Method, register_method
from nas.config import ArchConfig, BlockConfig, Candidate, Recipe
from nas.data import Dataset
from nas.methods import DistillConfig
from nas.measure import file_lock
from nas.train import accuracy, seed_everything, train

if TYPE_CHECKING:
    from nas.methods import CompressionConfig

__all__ = ["kd_loss", "teacher_arch", "get_teachers", "distill_loss_fn", "Distill"]


def kd_loss(student: torch.Tensor, targets: torch.Tensor, teacher_probs_T: torch.Tensor, alpha: float, T: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    soft = F.kl_div(F.log_softmax(student / T, dim=1), teacher_probs_T, reduction="batchmean") * (T * T)
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, targets)


def teacher_arch(data: Dataset) -> ArchConfig:
    """A plain, wide conv net: larger than anything in the bundled spaces."""
    blocks = (BlockConfig("conv", 64, 3 if data.spatial == "2d" else 5, 1, stage=0),
              BlockConfig("conv", 96, 3 if data.spatial == "2d" else 5, 2, stage=1),
              BlockConfig("conv", 128, 3, 2, stage=2))
    return ArchConfig(data.in_channels, data.num_classes, data.input_size, data.spatial, 32, blocks)


def data_digest(data: Dataset) -> str:
    """sha256 of the training split's content (inputs and labels)."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_key(data: Dataset, cand: Candidate, seed: int) -> str:
    return hashlib.sha256(f"{data_digest(data)}|{cand.to_json()}|{seed}".encode()).hexdigest()[:24]


def _train(data: Dataset, cand: Candidate, seed: int) -> nn.Module:
    seed_everything(seed)
    model = build(cand.arch)
    train(model, data.x_train, data.y_train, cand.recipe, seed)
    return model


def _train_or_load(folder: Path | None, data: Dataset, seed: int, epochs: int) -> nn.Module:
    cand = Candidate(teacher_arch(data), recipe=Recipe(epochs=epochs, lr=5e-3))
    if folder is None:
        return _train(data, cand, seed).eval()
    key = teacher_key(data, cand, seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights, meta = folder / f"teacher-{key}.safetensors", folder / f"teacher-{key}.json"
    with file_lock(folder / "teachers.lock"):
        model = build(cand.arch)
        if weights.is_file() and meta.is_file():
            model.load_state_dict(load_file(str(weights)))
        else:
            model = _train(data, cand, seed)
            tmp = weights.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            tmp.replace(weights)
            meta.write_text(json.dumps({"candidate": cand.to_dict(), "seed": seed, "data_sha256": data_digest(data),
                                        "val_accuracy": accuracy(model, data.x_val, data.y_val)}))
    return model.eval()


_TEACHERS: dict[tuple, tuple[nn.Module, ...]] = {}


def get_teachers(folder: str | Path | None, data: Dataset, n: int = 1, epochs: int = 20) -> Sequence[nn.Module]:
    """The study's ``n`` teachers: trained on first use, then loaded from ``folder`` (the
    study's artifacts; ``None``: this process's memory only)."""
    key = (str(folder), data_digest(data), data.seed, n, epochs)
    if key not in _TEACHERS:
        where = Path(folder) if folder is not None else None
        _TEACHERS[key] = tuple(_train_or_load(where, data, data.seed + 1000 + i, epochs) for i in range(n))
    return _TEACHERS[key]


def distill_loss_fn(teachers: Sequence[nn.Module], alpha: float, T: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the teachers run where the student trains (nas.device)
            probs = torch.stack([F.softmax(t.to(inputs.device)(inputs) / T, dim=1) for t in teachers]).mean(0)
        return kd_loss(logits, targets, probs, alpha, T)

    return loss


@register_method
class Distill(Method):
    """Knowledge distillation from the study's teacher(s): a training loss, no structure."""

    config = DistillConfig
    example, effect = {"distill_alpha": 0.5}, ("loss",)

    def loss(self, cfg: CompressionConfig, task: Any, data: Any) -> Callable[..., Any] | None:
        # the study's own folder (never a shared temp folder other users could write into)
        folder = Path(task.artifacts_dir) / "teachers" if task.artifacts_dir else None
        return distill_loss_fn(get_teachers(folder, data, task.teachers, task.teacher_budget()), cfg.distill_alpha,
                               cfg.distill_T)
