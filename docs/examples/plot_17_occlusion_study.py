"""
Zeiler and Fergus's occlusion study (Figure 7)
==============================================

``lv.occlusion_study`` slides a grey square over one image and records, per placement, what Zeiler and Fergus
plotted in their Figure 7: (b) the total activation of the feature map that fires most on the unoccluded image,
(c) that map's strongest activation projected back to the pixels (here with guided backprop), (d) the probability
of the class and (e) the most probable label. ``.plot(class_names)`` draws the five panels; ``.save(path)`` writes
them. On the command line: ``lightning-vis occlusion-study``; in the explorer: the "occlude this image" button.
A small photo and a coarse stride keep this example fast (49 placements).
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
image = demo.normalize(demo.photos(["coffee"], size=128))[0]
study = lv.occlusion_study(model, image, "features.13", window=32, stride=16, projections=4, rule="guided")
print(study.layer, "map", study.channel, classes[study.target], "p =", round(study.reference[1], 3),
      "placements", tuple(study.probability.shape))

fig = study.plot(classes, fig=plt.figure(figsize=(15, 3.4)))  # without fig=, a figure outside pyplot
