"""Errors a user can act on. Entry points print them as one line and exit non-zero."""


class DollyError(Exception):
    """A problem with the user's input or setup, stated in one line."""


class ConfigError(DollyError, ValueError):
    """An unknown config key or a bad value."""


class DataError(DollyError):
    """A dataset file that is missing, unreadable, empty, or lacks the needed columns."""
