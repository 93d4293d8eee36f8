"""The atlas: every unit of a model, at scale (Microscope for any PyTorch model).

Per unit (a channel of a conv layer, a hidden dimension of a token layer, a feature of a linear layer): its render,
its negative render and a few diverse renders (Lucid's diversity objective, batched); its top-k and bottom-k
dataset examples, each with the receptive-field crop and the activation map over the input; the distribution of
its activation over the dataset; its health (dead, duplicate, noise-only); the strongest positive and negative
connections to units of the previous and next layers (expanded weights, lightning_vis.circuits), each shown with
that unit's render and linked to its page. Per layer: an index of its units with filters (dead, duplicates, noisy,
most selective) and a search by unit. Per model: every layer with its shape and layout, and a search.

    import lightning_vis.atlas as atlas
    atlas.build(model, dataset, "out/atlas", ["features.4", "features.10"], preprocess=normalize, k=9)

    lightning-vis atlas --model torchvision:vgg16 --weights vgg16.pth --images photos/ --devices 2 --strategy ddp

One streaming pass over the data gives every layer's top/bottom-k, histograms and activity (exact). With Lightning
Fabric (``fabric=``, or ``--devices`` / ``--num-nodes`` / ``--strategy ddp`` from the command line) the dataset pass
is sharded by a distributed sampler and merged exactly, and units are dealt out to the ranks in chunks, each
rendered in two batched optimisations (positive and negative renders, then diverse ones); renders are seeded by what
they render, so any number of processes writes the same files. Each unit's folder is written whole (temporary name,
then renamed): a run that dies resumes where it stopped, a finished run is a no-op. The output folder must be shared
by all nodes.

The site is static: open index.html from disk or serve the folder from any static host.
"""

from .build import AtlasError, AtlasResult, build, default_layers, fingerprint
from .comm import Comm, make_fabric
from .settings import Settings

__all__ = ["AtlasError", "AtlasResult", "Comm", "Settings", "build", "default_layers", "fingerprint", "make_fabric"]
