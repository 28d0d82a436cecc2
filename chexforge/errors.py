"""User-facing errors: one line naming the file, the place and what was expected.

Anything raised as a `UserError` is bad input (a recipe, a flag, a label file, a checkpoint);
the CLI prints its single line and exits with status 2. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input. `where` is a file, optionally with `:line:column` or a row/column."""

    exit_code = 2

    def __init__(self, message: str, where: str | Path | None = None):
        self.message = message
        self.where = str(where) if where is not None else None
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def located(path: str | Path | None, line: int | None = None, col: int | None = None) -> str | None:
    """Format `file:line:column` (1-based) the way compilers and editors expect."""
    if path is None:
        return None
    if line is None:
        return str(path)
    if col is None:
        return f"{path}:{line}"
    return f"{path}:{line}:{col}"
