"""The one error type kdlib raises for bad input.

It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep
working, and so the CLI can print the message alone (no traceback) for any
mistake the user can fix.
"""


class KdlibError(ValueError):
    """Bad input: the message says what was wrong, what was expected and what to do."""


def choices(values) -> str:
    """Render valid choices for an error message: ``a, b, c``."""
    return ", ".join(str(v) for v in values)
