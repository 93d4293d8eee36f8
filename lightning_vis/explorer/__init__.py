"""Layer 5: a local web explorer (quiver and the deconvnet web UI, for any PyTorch model), safe to leave running.

    lightning_vis.serve(model, "photos/", labels)      # or: lightning-vis serve --model ... --images photos/
"""

from .server import Explorer, Limits, serve
from .web import make_server

__all__ = ["Explorer", "Limits", "make_server", "serve"]
