"""Training loops (nas.train): learning, reproducibility, callbacks, non-finite losses."""

from __future__ import annotations

import pytest
import torch

from nas.builder import build
from nas.config import ArchConfig, BlockConfig, Recipe
from nas.errors import ConfigError, TrialFailure
from nas.pipeline import get_dataset
from nas.train import accuracy, augment, predict, seed_everything, train

ARCH = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 2, stage=0),))


def _trained(seed: int, epochs: int = 4, recipe: Recipe | None = None, **kw):
    data = get_dataset("digits", 0)
    seed_everything(seed)
    model = build(ARCH)
    stats = train(model, data.x_train, data.y_train, recipe or Recipe(epochs=epochs, lr=0.01), seed, **kw)
    return model, stats, data


def test_training_learns_and_is_reproducible():
    a, stats, data = _trained(0)
    b, _, _ = _trained(0)
    assert stats.epochs == 4 and accuracy(a, data.x_val, data.y_val) > 0.5  # chance is 0.1
    torch.testing.assert_close(predict(a, data.x_val), predict(b, data.x_val))


def test_on_epoch_is_called_after_every_epoch():
    seen = []
    _trained(0, epochs=3, on_epoch=lambda epoch, model: seen.append(epoch))
    assert seen == [1, 2, 3]


def test_a_non_finite_loss_is_a_trial_failure():
    with pytest.raises(TrialFailure, match="loss"):
        _trained(0, loss_fn=lambda logits, y, x: (logits * float("nan")).sum())


def _blob(n: int, h: int = 16, w: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 1, h, w)
    x[:, :, h // 2 - 2 if h > 1 else 0 : h // 2 + 2 if h > 1 else 1, w // 2 - 2 : w // 2 + 2] = 1.0
    return x


def _centre(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2:]
    m = x.sum((1, 2, 3))
    cy = (x.sum((1, 3)) * torch.arange(h)).sum(1) / m
    cx = (x.sum((1, 2)) * torch.arange(w)).sum(1) / m
    return torch.stack([cy, cx], 1)


def test_augment_none_is_the_batch_itself():
    x = _blob(3)
    assert augment(x, "none", torch.Generator().manual_seed(0)) is x


def test_shift_moves_each_sample_by_at_most_an_eighth_and_keeps_it_whole():
    x = _blob(64)
    out = augment(x, "shift", torch.Generator().manual_seed(0))
    moved = _centre(out) - _centre(x)
    assert moved.abs().max() <= 16 / 8 + 1e-4  # at most 2 px on a 16-px side
    assert moved.abs().max() > 1.0 and moved.std(0).min() > 0.3  # every sample its own random shift
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a translation, nothing lost at 2 px
    again = augment(x, "shift", torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)  # seeded


def test_shift_on_1d_signals_moves_along_the_signal_only():
    x = _blob(32, h=1, w=40)
    out = augment(x, "shift", torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    moved = _centre(out) - _centre(x)
    assert moved[:, 0].abs().max() == 0 and 0 < moved[:, 1].abs().max() <= 40 / 8 + 1e-4


def test_affine_rotates_and_scales_as_well():
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 7:9, 2:14] = 1.0  # a horizontal bar: a rotation tilts it, a shift does not
    out = augment(x, "affine", torch.Generator().manual_seed(0))
    rows_hit = (out > 0.05).any(3).sum((1, 2))  # rows the bar touches
    assert rows_hit.max() > 3  # tilted by up to 10 degrees across 12 px (a shift alone keeps <= 3 rows)
    shifted = augment(x, "shift", torch.Generator().manual_seed(0))
    assert (shifted > 0.05).any(3).sum((1, 2)).max() <= 3


def test_training_with_augmentation_differs_and_is_reproducible():
    a, _, data = _trained(0, recipe=Recipe(epochs=2, lr=0.01, augment="shift"))
    b, _, _ = _trained(0, recipe=Recipe(epochs=2, lr=0.01, augment="shift"))
    c, _, _ = _trained(0, recipe=Recipe(epochs=2, lr=0.01))
    torch.testing.assert_close(predict(a, data.x_val), predict(b, data.x_val))
    assert not torch.allclose(predict(a, data.x_val), predict(c, data.x_val))


def test_unknown_augmentation_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"augment 'flip' is not one of none, shift, affine"):
        Recipe(augment="flip")


def test_affine_on_a_1d_dataset_fails_before_training():
    from nas.config import Candidate
    from nas.pipeline import Task, evaluate

    arch = ArchConfig(1, 10, (1, 40), "1d", 8, (BlockConfig("conv", 8, 3, 2, stage=0),))
    cand = Candidate(arch, recipe=Recipe(epochs=1, augment="affine"))
    with pytest.raises(TrialFailure, match="augment 'affine' rotates and scales 2-D inputs; this dataset is 1-D"):
        evaluate(cand, Task(dataset="mnist1d"))


@pytest.mark.parametrize("h,w", [(16, 16), (24, 32), (32, 24), (8, 64)])
def test_affine_rotates_by_at_most_10_degrees_on_any_aspect_ratio(h, w):

    x = torch.zeros(256, 1, h, w)
    x[:, :, :, w // 2] = 1.0  # a vertical line across the whole height
    out = augment(x, "affine", torch.Generator().manual_seed(0))[:, 0]
    cx = (out * torch.arange(w)).sum(2) / out.sum(2).clamp_min(1e-6)  # the line's column in each row
    tilt = torch.rad2deg(torch.atan(((cx[:, -1] - cx[:, 0]) / (h - 1)).abs()))
    assert 6 < tilt.max() <= 10.6  # sheared grids tilted 8x64 inputs by 55 degrees


def test_accuracy_is_the_exact_fraction():
    # 632 of 645 right: a float32 mean gives 0.97984498739..., above the candidate's exact 632/645
    y = torch.zeros(645, dtype=torch.long)
    logits = torch.zeros(645, 2)
    logits[:632, 0] = 1.0
    logits[632:, 1] = 1.0
    assert accuracy(torch.nn.Identity(), logits, y) == 632 / 645


def test_images_train_channels_last_and_come_back_in_the_standard_layout():
    from nas.builder import build
    from nas.config import ArchConfig, BlockConfig, Recipe
    from nas.train import train

    seen = []
    model = build(ArchConfig(3, 10, (8, 8), "2d", 8, (BlockConfig("dsconv", 8, 3, 1, stage=0),)))
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))  # (one channel is both layouts at once)
    train(model, x, y, Recipe(epochs=1, batch_size=16), seed=0)
    assert seen and all(seen)  # every training batch in channels-last memory
    assert all(p.is_contiguous() for p in model.parameters())  # back in the standard layout
