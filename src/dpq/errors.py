"""User-facing errors: the CLI prints them as one line and exits with code 2, never a traceback."""


class DpqError(Exception):
    """A mistake the user can fix (bad flag, bad file, missing input). Message is one line."""

    exit_code = 2
