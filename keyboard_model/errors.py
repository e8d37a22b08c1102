"""Errors a user can act on. Commands print their message instead of a traceback."""


class UserFacingError(RuntimeError):
    """Bad input or a missing service; the message says what is wrong and what to do."""
