"""lightning-vis: see what convolutional networks learn and where they look."""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (loads the compiled operators)
