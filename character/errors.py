"""Errors the CLI reports as one line (`error: ...`, exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, a field, an option. Raised before anything is spent."""
