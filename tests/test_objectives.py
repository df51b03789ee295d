"""Objective names, directions and the MnasNet reward."""

from __future__ import annotations

import pytest

from nas.objectives import mnasnet_reward  # noqa: E402


@pytest.mark.parametrize("form,ratio,expected", [
    ("soft", 0.5, 0.9 * 0.5 ** -0.07),  # faster than target: small bonus
    ("soft", 1.0, 0.9),
    ("soft", 2.0, 0.9 * 2.0 ** -0.07),  # slower: small penalty, symmetric exponent
    ("hard", 0.5, 0.9),                 # under target: no bonus at all
    ("hard", 1.0, 0.9),
    ("hard", 2.0, 0.45),                # over target: accuracy halved at 2T
])
def test_mnasnet_reward_shape(form, ratio, expected):
    assert mnasnet_reward(0.9, ratio * 40.0, 40.0, form) == pytest.approx(expected)
    # by hand: 0.5 ** -0.07 = 1.04971, 2 ** -0.07 = 0.95265
    if form == "soft" and ratio != 1.0:
        assert mnasnet_reward(0.9, ratio * 40.0, 40.0, form) == pytest.approx(0.9 * (1.04971 if ratio < 1 else 0.95265), rel=1e-4)
