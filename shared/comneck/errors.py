"""Errors that are the user's to fix, kept apart from programming errors.

Front ends (CLIs, the HTTP gateway) catch :class:`ComneckInputError` and show its
one-line message instead of a traceback.
"""


class ComneckInputError(ValueError):
    """Bad input from a user: a file that is no image, a tensor of the wrong shape, ..."""
