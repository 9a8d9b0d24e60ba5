"""Errors a user can fix. The CLI prints them as one line; the service maps them to 4xx."""


class UserError(ValueError):
    """Base class: a mistake in the user's input, with a message that says what to fix."""


class ModelLoadError(UserError):
    """A model file could not be loaded safely, or does not fit what was asked for."""


class DataError(UserError):
    """A dataset could not be found or has the wrong shape or labels."""


class ConfigError(UserError):
    """An unknown name or an out-of-range hyper-parameter."""


class Cancelled(Exception):
    """Raised inside training or evaluation when the cooperative cancel check says stop."""
