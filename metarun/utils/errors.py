"""Errors a user can fix; the entry point prints them as one line and exits nonzero."""


class MetarunError(Exception):
    """A problem with the user's input (config, files, data) rather than a bug."""


class ConfigError(MetarunError, ValueError):
    """A config value is out of range or inconsistent (also a ValueError, for code that calls a
    model or task directly from Python)."""


class CheckpointError(MetarunError):
    """A checkpoint is missing, truncated or unreadable."""


class DivergedError(MetarunError):
    """Training produced a non-finite loss."""
