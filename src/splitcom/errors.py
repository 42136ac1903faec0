"""Errors that reach the user as one line and exit code 2 (never a traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config key, a file, a CLI argument.

    ``where`` names the offending thing (a dotted config key, a path with a line, a client id)
    so the one-line message says what is wrong and where.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ProtocolError(Exception):
    """A message that violates the wire protocol (bad field, unknown sample id, bad shape).

    ``field`` names the offending message field so the transport can report it precisely.
    """

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
