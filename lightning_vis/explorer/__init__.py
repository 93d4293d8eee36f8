"""Layer 5: a local web explorer (quiver and the deconvnet web UI, for any PyTorch model).

    lightning_vis.serve(model, "photos/", labels)      # or: lightning-vis serve --model ... --images photos/
"""

from .server import Explorer, serve

__all__ = ["Explorer", "serve"]
