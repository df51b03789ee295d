"""Training loops (nas.train): learning, reproducibility, callbacks, non-finite losses."""

from __future__ import annotations

import pytest
import torch

from nas.builder import build
from nas.config import ArchConfig, BlockConfig, Recipe
from nas.errors import TrialFailure
from nas.pipeline import get_dataset
from nas.train import accuracy, predict, seed_everything, train

ARCH = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 2, stage=0),))


def _trained(seed: int, epochs: int = 4, **kw):
    data = get_dataset("digits", 0)
    seed_everything(seed)
    model = build(ARCH)
    stats = train(model, data.x_train, data.y_train, Recipe(epochs=epochs, lr=0.01), seed, **kw)
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
