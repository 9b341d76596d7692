"""The one exception type that means "the user must change something".

The CLI maps it to exit code 2 and a single `error: ...` line; every other exception is a bug
(exit 1, with its traceback).
"""


class UserError(Exception):
    """A mistake the user can fix: bad flag, missing data, unusable checkpoint, config too big."""
