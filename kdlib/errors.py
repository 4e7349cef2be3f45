"""The one error type kdlib raises for bad input.

It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep
working, and so the CLI can print the message alone (no traceback) for any
mistake the user can fix; notebooks show the message alone too.
"""


class KdlibError(ValueError):
    """Bad input: the message says what was wrong, what was expected and what to do."""

    def _render_traceback_(self) -> list[str]:
        # IPython (notebooks, Colab) shows an exception through this hook when it has one: the message
        # alone, as the CLI prints it. The cell still fails, so Run all stops there.
        return [f"error: {self}"]


def choices(values) -> str:
    """Render valid choices for an error message: ``a, b, c``."""
    return ", ".join(str(v) for v in values)
