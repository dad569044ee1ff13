"""The one error type a user can fix: the CLI prints its message and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and what to do about it."""
