"""Errors a user can cause: each names where the problem is and what was expected.

The CLI catches ``UserError`` and prints its message with exit code 2, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, files); shown without a traceback."""


class ConfigError(UserError):
    """A config problem at ``file``, ``[table]``, ``field``."""

    def __init__(self, message: str, *, file: str | None = None, table: str | None = None,
                 field: str | None = None):
        self.file = file
        self.table = table
        self.field = field
        self.detail = message
        where = []
        if file:
            where.append(str(file))
        if table:
            where.append(f"[{table}]")
        if field:
            where.append(field)
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DataError(UserError):
    """A problem in a data file at ``file`` line ``line`` (1-based; None for whole-file issues)."""

    def __init__(self, message: str, *, file: str, line: int | None = None):
        self.file = file
        self.line = line
        self.detail = message
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {message}")
