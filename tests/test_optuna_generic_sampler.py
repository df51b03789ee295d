"""Optuna's own generic sampler test cases (``optuna.testing.pytest_samplers``, shipped with the
installed Optuna) run against the surrogate sampler, as Optuna runs them against its samplers:
every distribution kind, conditional and dynamic spaces, NaN and infinite objectives, pruned and
failed trials, enqueued trials, multi-objective studies."""

from __future__ import annotations

import pytest
from optuna.testing.pytest_samplers import BasicSamplerTestCase, MultiObjectiveSamplerTestCase

from nas.samplers import SurrogateSampler


def _surrogate() -> SurrogateSampler:
    return SurrogateSampler(seed=None, n_startup=0, n_candidates=32)


def _surrogate_gp() -> SurrogateSampler:  # the slow set (CI runs it): ~85 cases of GP fits
    return SurrogateSampler(seed=None, n_startup=0, n_candidates=32, model="gp")


class TestSurrogateAsABasicSampler(BasicSamplerTestCase):
    @pytest.fixture(params=[_surrogate, pytest.param(_surrogate_gp, marks=pytest.mark.slow)], ids=["trees", "gp"])
    def sampler(self, request):  # noqa: ANN001, ANN201 - Optuna's fixture protocol
        return request.param


class TestSurrogateAsAMultiObjectiveSampler(MultiObjectiveSamplerTestCase):
    @pytest.fixture(params=[_surrogate, pytest.param(_surrogate_gp, marks=pytest.mark.slow)], ids=["trees", "gp"])
    def sampler(self, request):  # noqa: ANN001, ANN201
        return request.param
