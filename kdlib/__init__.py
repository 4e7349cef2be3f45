"""kdlib: a controlled comparison of knowledge-distillation losses for a small GPT student."""

__version__ = "0.1.0"

from .errors import KdlibError  # noqa: E402,F401
