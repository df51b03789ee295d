"""The project's own error types.

Every error a user can cause (a bad space file, an unknown dataset, a malformed flag) is a
:class:`NasError`; the CLI prints its message on one line and exits with status 2.
"""

from __future__ import annotations

__all__ = ["NasError", "SpaceError", "DataError", "ConfigError", "BundleError", "TrialFailure"]


class NasError(ValueError):
    """A problem with user input: the message names what was wrong and what is allowed."""


class SpaceError(NasError):
    """A search-space file that cannot be used."""


class DataError(NasError):
    """A dataset name or file that cannot be used."""


class ConfigError(NasError):
    """A configuration value (experiment file, flag, stored config) that cannot be used."""


class BundleError(NasError):
    """A bundle (or another handed-over file) that is malformed or unsafe to load."""


class TrialFailure(RuntimeError):
    """A trial that cannot produce a result (NaN loss, infeasible shape, ...).

    Raised inside the trial pipeline; backends record the message as the trial's
    ``fail_reason`` and the study goes on.
    """
