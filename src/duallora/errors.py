"""Errors that duallora raises for bad input.

Every error a user can cause derives from :class:`DualLoRAError`; the CLI turns it into a one-line
message and exit code 2 instead of a traceback. Messages name the cause and the fix.
"""

from __future__ import annotations


class DualLoRAWarning(UserWarning):
    """Base class of duallora's warnings (a run goes on, but something deserves a look); the CLI
    prints them as one line ``warning: ...`` without the Python source location."""


class DualLoRAError(Exception):
    """Base class of every user-facing duallora error (bad config, data, backbone, training)."""


class ConfigError(DualLoRAError):
    """A config file, key or value is invalid (unknown key, wrong type, impossible combination)."""


class DataError(DualLoRAError):
    """A dataset is unknown, missing, unreadable or cannot be split as asked."""


class BackboneError(DualLoRAError):
    """A backbone name is unknown or its weights cannot be loaded."""


class TrainingError(DualLoRAError):
    """Training diverged (NaN or infinite loss) or cannot proceed."""


class DivergenceError(TrainingError):
    """Training diverged: the loss or the task statistics became NaN or infinite.

    Resuming repeats it; the way out is a new run with a lower learning rate."""


class CheckpointError(DualLoRAError):
    """A checkpoint or run directory is missing, incomplete or does not match the request."""
