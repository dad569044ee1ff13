"""Errors a user can fix. The CLI prints their message on one line and exits with code 2.

Library code names *arguments* (``lam``, ``guidance``), never command-line flags: the same
code runs inside a Flower ServerApp, where there are no flags. `InvalidArgument` carries
the argument's name so the CLI can say which flag it came from.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and what to do about it."""


class InvalidArgument(UserError):
    """An argument's value is unusable; `argument` is its name in the library's signature."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument
        self.message = message

    def __str__(self) -> str:
        return f"{self.argument}: {self.message}"


class IntegrityError(UserError):
    """Stored or downloaded bytes do not match their recorded or expected sha256 or size."""


class UnsafeManifest(UserError):
    """A manifest or registry answer names a path or URL that could write or read outside its place."""
