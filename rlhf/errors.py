"""Errors the user is meant to read.

Every error raised on bad input derives from ``RLHFError`` and says what was wrong, where (file:row, config key or
path) and what to change. Launchers catch ``RLHFError`` and print its message without a traceback.
"""

from __future__ import annotations


class RLHFError(Exception):
    """Base class of the errors a user can fix by changing their input, config or environment."""


class ConfigError(RLHFError):
    """A config file or override is invalid (unknown key, wrong type, out-of-range value)."""


class DataError(RLHFError):
    """A dataset cannot be used: unreadable file, wrong schema, or too many bad rows."""


class CheckpointError(RLHFError):
    """A stage output or checkpoint directory is missing, incomplete or does not match what is expected."""


class StageFailed(RLHFError):
    """A stage the pipeline launched stopped without a complete output; ``exit_status`` is what it exited with."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class TrainingDiverged(RLHFError):
    """Training produced non-finite numbers for too many updates in a row; a checkpoint of the last good weights
    was saved."""
