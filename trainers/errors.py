"""User-facing errors.

Every mistake a user can make (a bad config value, a missing file, an incompatible checkpoint)
raises a subclass of :class:`UserError` whose message is one line naming the field or file and
the fix. The CLI prints that line and exits non-zero without a traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "CheckpointError", "TrainingDiverged"]


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the one line to show."""


class ConfigError(UserError, ValueError):
    """A config value is unknown, mistyped or out of range. Message names the dotted path."""


class DataError(UserError):
    """A dataset path, file or content is unusable."""


class CheckpointError(UserError):
    """A checkpoint is corrupt, missing or from a different model configuration."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
