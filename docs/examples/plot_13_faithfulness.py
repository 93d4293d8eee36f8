"""
Which map to trust: faithfulness metrics
========================================

``lightning_vis.metrics.evaluate`` scores attribution methods on your model and images: deletion and insertion
curves (the score as the most important pixels are removed or revealed), ROAD, average drop / increase in
confidence, and the model-randomisation sanity check (does the map change when the weights do?). A random map is the
reference every method must beat. ``lightning-vis evaluate`` does the same from the command line.
"""

import matplotlib.pyplot as plt

from lightning_vis import demo
from lightning_vis.metrics import evaluate

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea", "coffee"], size=128)
ev = evaluate(model, demo.normalize(images), methods=["gradcam", "saliency"],
              metrics=["deletion", "insertion", "average_drop"], steps=8, layer="features.18")
print(ev.table())

fig = ev.plot_curves()
plt.show()
