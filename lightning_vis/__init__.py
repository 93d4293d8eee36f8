"""lightning-vis: see what convolutional networks learn and where they look."""

__version__ = "0.1.0"

from . import hooks, ops  # noqa: F401  (ops loads the compiled operators)
from .hooks import capture, layers, resolve_layers  # noqa: F401
