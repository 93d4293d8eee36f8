"""Targets for models whose output is not (N, classes) logits: what score a method explains, per input.

A target is any callable ``f(output) -> (N,)`` scores (one per input, differentiable); the methods apply it to
whatever the model returns (tensor, dict, list of dicts, tuple, dataclass) before looking at the output's type.
Ready-made ones, in the spirit of pytorch-grad-cam's ``model_targets``:

    lv.grad_cam(fcn, images, "backbone.layer4", target=targets.segmentation(15, mask))    # person pixels
    lv.grad_cam(frcnn, images, "backbone.body.layer4", target=targets.detection(boxes, labels))
    lv.grad_cam(detr, images, target=targets.detection(boxes, labels, size=images.shape[-2:]))  # DETR queries
    lv.saliency(embedder, images, target=targets.similarity(reference_embedding))
    lv.saliency(model_with_tuple_output, images, target=targets.classifier(281, key=0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def describe(output, depth: int = 0) -> str:
    """A one-line description of a model output's structure: 'dict with out (2, 21, 64, 64), aux (...)', 'list of 2
    dicts with boxes (5, 4), labels (5,), scores (5,)'."""
    if isinstance(output, Tensor):
        return f"tensor {tuple(output.shape)}"
    if depth > 2:
        return type(output).__name__
    if isinstance(output, dict):
        items = ", ".join(f"{k!s} {describe(v, depth + 1).removeprefix('tensor ')}"
                          for k, v in list(output.items())[:6])
        return f"dict with {items}" + (", ..." if len(output) > 6 else "")
    if isinstance(output, (list, tuple)):
        if output and all(isinstance(v, dict) for v in output):
            return f"{type(output).__name__} of {len(output)} dicts, the first: {describe(output[0], depth + 1)}"
        items = ", ".join(describe(v, depth + 1) for v in output[:4])
        return f"{type(output).__name__} of {len(output)}: {items}" + (", ..." if len(output) > 4 else "")
    fields = getattr(output, "__dataclass_fields__", None)
    if fields:
        items = ", ".join(f"{k} {describe(getattr(output, k), depth + 1).removeprefix('tensor ')}" for k in fields)
        return f"{type(output).__name__}({items})"
    return type(output).__name__


def field(output, names: tuple[str, ...]) -> Tensor | None:
    """The first tensor among `names` in a model output that names its parts: a dict's key (transformers'
    ModelOutput is a dict), a dataclass's or a namedtuple's field; None when there is none (or the output is
    a tensor, a list or a plain tuple, whose parts have no names)."""
    named = isinstance(output, dict) or hasattr(output, "__dataclass_fields__") or \
        (isinstance(output, tuple) and hasattr(output, "_fields"))
    for name in names if named else ():
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    return None


def _pick(output, key, what: str, default: tuple[str, ...] = ()):
    """output[key] (or the field `key`) as a tensor; with no key the output itself when it is a tensor, else the
    first of the `default` fields it has."""
    if key is None:
        found = output if isinstance(output, Tensor) else field(output, default)
        if found is not None:
            return found
        looked = f" with no {' or '.join(map(repr, default))}" if default else ""
        raise ValueError(f"{what}: the model returned a {describe(output)}{looked}; pass key= to say which part to "
                         "use")
    try:
        picked = getattr(output, key) if isinstance(key, str) and not isinstance(output, dict) else output[key]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"{what}: no {key!r} in the model output, a {describe(output)}") from None
    if not isinstance(picked, Tensor):
        raise ValueError(f"{what}: output[{key!r}] is a {describe(picked)}, not a tensor")
    return picked


def _class_indices(category) -> Tensor | None:
    """Class indices (one, or one per input) as a flat int64 tensor (None for None: the top class); integer-valued
    floats (3.0) are accepted, anything else (3.5, booleans, text) is refused."""
    if category is None:
        return None
    try:
        t = torch.as_tensor(category)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"classifier target: category must be a class index or one per input, not "
                         f"{category!r}") from None
    if t.dtype == torch.bool or t.is_complex() or t.dim() > 1 or t.numel() == 0:
        raise ValueError(f"classifier target: category must be a class index or one per input (integers), not "
                         f"{category!r}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ValueError(f"classifier target: class indices must be whole numbers, got {category!r}")
    return t.long().flatten()


class classifier:
    """The logit of `category` (one class, one per input, or None: each input's top class) in (N, classes) logits,
    or in output[key] for dict, tuple and dataclass outputs (with no key: their `logits`, as transformers'
    classifiers return them)."""

    def __init__(self, category=None, key=None):
        self.category, self.key = category, key
        self._classes = _class_indices(category)

    def __call__(self, output) -> Tensor:
        logits = _pick(output, self.key, "classifier target", LOGITS)
        if logits.dim() != 2:
            raise ValueError(f"classifier target: expected (N, classes) logits, got {tuple(logits.shape)}")
        if self._classes is None:
            return logits.max(1).values
        c = self._classes.to(logits.device)
        c = c.expand(logits.shape[0]) if c.numel() == 1 else c
        if c.numel() != logits.shape[0]:
            raise ValueError(f"classifier target: {c.numel()} classes for a batch of {logits.shape[0]}")
        if int(c.min()) < 0 or int(c.max()) >= logits.shape[1]:
            raise ValueError(f"classifier target: class out of range 0..{logits.shape[1] - 1}")
        return logits.gather(1, c.view(-1, 1))[:, 0]


class segmentation:
    """Semantic segmentation: the sum of `category`'s score over the pixels of `mask` ((H, W) or (N, H, W), bool or
    0/1; default: the pixels the model assigns to `category`), from (N, classes, H, W) scores, or output[key]
    (default: "out", torchvision's segmentation models, or "logits", transformers'). Scores smaller than the mask
    (SegFormer's are at 1/4 of the input) are upsampled to it first, bilinearly, as transformers' own
    post-processing does."""

    def __init__(self, category: int, mask: Tensor | None = None, key=None):
        self.category, self.mask, self.key = int(category), mask, key

    def __call__(self, output) -> Tensor:
        scores = _pick(output, self.key, "segmentation target", ("out", "logits"))
        if scores.dim() != 4:
            raise ValueError(f"segmentation target: expected (N, classes, H, W) scores, got {tuple(scores.shape)}")
        if not 0 <= self.category < scores.shape[1]:
            raise ValueError(f"segmentation target: class {self.category} out of range 0..{scores.shape[1] - 1}")
        if self.mask is None:
            mask = scores.detach().argmax(1) == self.category
        else:
            mask = self.mask.to(scores.device).bool()
            if mask.dim() not in (2, 3) or mask.shape[-2] < scores.shape[-2] or mask.shape[-1] < scores.shape[-1]:
                raise ValueError(f"segmentation target: mask {tuple(mask.shape)} does not match the scores' "
                                 f"{tuple(scores.shape[-2:])} (it may be larger: the scores are upsampled to it)")
            if mask.shape[-2:] != scores.shape[-2:]:
                scores = F.interpolate(scores, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            mask = mask.expand(scores.shape[0], *scores.shape[-2:])
        return (scores[:, self.category] * mask).flatten(1).sum(1)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter).clamp_min(1e-12)


def _detr(output, size, no_object: bool) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Per image (boxes xyxy, labels, scores) of every query of a DETR-style output (`logits` (N, Q, C + 1), the
    last class "no object", or with no_object=False (N, Q, C) scored by a sigmoid each, and `pred_boxes` (N, Q, 4)
    cx, cy, w, h normalised to the image): each query's label and score are its most probable object class and
    that probability (transformers' post-processing). Boxes are scaled to `size` (H, W) in pixels when it is
    given. None when the output is not DETR-style."""
    logits, boxes = field(output, ("logits",)), field(output, ("pred_boxes",))
    if logits is None or boxes is None or logits.dim() != 3 or logits.shape[-1] < 2 or boxes.dim() != 3 \
            or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        return None
    scores, labels = (logits.softmax(-1)[..., :-1] if no_object else logits.sigmoid()).max(-1)
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    if size is not None:
        xyxy = xyxy * xyxy.new_tensor([size[1], size[0], size[1], size[0]])
    return list(zip(xyxy.unbind(0), labels.unbind(0), scores.unbind(0), strict=True))


class detection:
    """Object detection: per image, the sum over target boxes of the score of the best detection with the same
    label and an IoU of at least `iou` (pytorch-grad-cam's FasterRCNNBoxScoreTarget). boxes: (K, 4) xyxy for every
    image, or one (K_i, 4) per image; labels likewise.

    Reads torchvision's detectors (Faster/Mask/RetinaNet/FCOS/SSD: a list of dicts with boxes, labels, scores) and
    DETR-style outputs (per-query `logits` and `pred_boxes` (N, Q, 4) cx, cy, w, h normalised; each query is a
    detection with its most probable class): by default DETR's and YOLOS's (N, Q, C + 1) logits, softmax, "no
    object" last; no_object=False for heads trained with a sigmoid per class and no such class (Conditional and
    Deformable DETR, RT-DETR: the output does not say which, so the caller does). DETR's boxes are compared in
    normalised coordinates unless `size` = the input's (H, W) puts them in pixels; boxes outside 0..1 with no
    `size` are refused rather than matched to nothing."""

    def __init__(self, boxes, labels, iou: float = 0.5, size: tuple[int, int] | None = None, no_object: bool = True):
        self.boxes, self.labels, self.iou, self.no_object = boxes, labels, float(iou), bool(no_object)
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def _for(self, value, i, n):
        if isinstance(value, (list, tuple)) and len(value) == n and not isinstance(value[0], (int, float)):
            return torch.as_tensor(value[i])
        return torch.as_tensor(value)

    def _detections(self, output) -> tuple[list[tuple[Tensor, Tensor, Tensor]], bool]:
        """Per image (boxes, labels, scores), and whether the boxes are normalised to 0..1."""
        fields = {"boxes", "labels", "scores"}
        if isinstance(output, (list, tuple)) and all(isinstance(d, dict) and fields <= set(d) for d in output):
            return [(d["boxes"], d["labels"], d["scores"]) for d in output], False
        found = _detr(output, self.size, self.no_object)
        if found is None:
            raise ValueError(f"detection target: expected a list of dicts with boxes, labels and scores, or "
                             f"DETR-style logits (N, queries, classes + 1) and pred_boxes (N, queries, 4), got a "
                             f"{describe(output)}")
        return found, self.size is None

    def __call__(self, output) -> Tensor:
        detections, normalised = self._detections(output)
        n = len(detections)
        totals = []
        for i, (det_boxes, det_labels, det_scores) in enumerate(detections):
            boxes = self._for(self.boxes, i, n).to(det_boxes).view(-1, 4)
            labels = self._for(self.labels, i, n).to(det_labels.device).long().view(-1)
            if boxes.shape[0] != labels.shape[0]:
                raise ValueError(f"detection target: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
            if normalised and boxes.numel() and not bool(((boxes >= 0) & (boxes <= 1)).all()):
                raise ValueError("detection target: DETR-style boxes are normalised to 0..1; give the target boxes "
                                 "normalised, or size=(H, W) of the input to compare in pixels")
            total = det_scores.sum() * 0  # stays in the graph where nothing matches
            if det_boxes.numel():
                ious = _iou(boxes, det_boxes)
                for k in range(boxes.shape[0]):
                    ok = (ious[k] >= self.iou) & (det_labels == labels[k])
                    if ok.any():
                        total = total + det_scores[ok].max()
            totals.append(total)
        return torch.stack(totals)


class similarity:
    """Embedding similarity: the cosine similarity of each input's embedding (N, D) (or output[key]) to
    `reference` (D,) or one per input (N, D) (pytorch-grad-cam's SimilarityToConceptTarget)."""

    def __init__(self, reference: Tensor, key=None):
        self.reference, self.key = reference, key

    def __call__(self, output) -> Tensor:
        emb = _pick(output, self.key, "similarity target").flatten(1)
        ref = self.reference.to(emb).flatten() if self.reference.dim() == 1 else self.reference.to(emb).flatten(1)
        if ref.shape[-1] != emb.shape[1]:
            raise ValueError(f"similarity target: reference has {ref.shape[-1]} dims, the embedding {emb.shape[1]}")
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=1)


#: the fields that hold class logits (N, classes), in the order they are looked for: transformers' classifiers, and
#: CLIP's image-text logits (each image's texts are its classes)
LOGITS = ("logits", "logits_per_image")
#: the fields that hold an image embedding (N, D): CLIP's projection, a pooled encoder output
EMBEDDINGS = ("image_embeds", "pooler_output", "embeds", "embeddings")


def _top_query(logits: Tensor, no_object: bool = True) -> Tensor:
    """Each image's most confident query's probability of its most probable class (DETR, Mask2Former: the last
    class is "no object")."""
    probs = logits.softmax(-1)[..., :-1] if no_object else logits.sigmoid()
    return probs.flatten(1).max(1).values


def _most_pixels(scores: Tensor) -> Tensor:
    """Per image, the score of the class most pixels are assigned, summed over those pixels."""
    labels = scores.detach().argmax(1)
    category = labels.flatten(1).mode(1).values
    mask = labels == category.view(-1, *[1] * (labels.dim() - 1))
    return (scores.gather(1, category.view(-1, 1, *[1] * (labels.dim() - 1)).expand(-1, 1, *labels.shape[1:]))[:, 0]
            * mask).flatten(1).sum(1)


def default(output) -> tuple[Tensor, str]:
    """What ``target=None`` explains on an output that is not (N, classes) logits, by the kind of output (never
    guessed from shapes alone: each rule needs the part named as the hubs name it, or a torchvision structure):

    - dense scores (N, classes, H, W) in a field `out` (torchvision) or `logits` (transformers): per image the
      class most pixels get, summed over them (segmentation with its own top class);
    - one mask's logits (N, H, W) in `logits` (CLIPSeg): the side (object or not) most pixels are on, summed;
    - detections: DETR-style `logits` (N, queries, classes + 1) + `pred_boxes`, Mask2Former's
      `class_queries_logits`, or torchvision's list of dicts: per image the most confident detection's probability
      (an open-vocabulary detector's, OWL-ViT's with its `text_embeds`: a sigmoid per text, no "no object" class);
    - an image embedding (N, D) (`image_embeds`, `pooler_output`): its length along its own direction (the dot
      product with its detached unit vector), i.e. what makes the embedding what it is.

    Returns (N,) scores and a few words saying which rule applied; anything else is refused in one line."""
    scores = field(output, ("out", "logits"))  # named so: a bare (N, C, H, W) tensor could be any feature map
    boxes = field(output, ("pred_boxes",))
    if scores is not None and scores.dim() == 4:
        return _most_pixels(scores), "the class most pixels get"
    if scores is not None and scores.dim() == 3 and boxes is None:  # one mask's logits (CLIPSeg): object or not
        return _most_pixels(torch.stack([-scores, scores], 1)), "the side of the mask most pixels are on"
    queries = field(output, ("class_queries_logits",))
    if queries is not None and queries.dim() == 3:
        return _top_query(queries), "the most confident query's class"
    if boxes is not None and scores is not None and scores.dim() == 3:
        # open-vocabulary detectors (OWL-ViT: the output carries its text queries' embeddings) score each text with a
        # sigmoid and have no "no object" class; DETR's softmax ends with one
        open_vocabulary = field(output, ("text_embeds",)) is not None
        return _top_query(scores, no_object=not open_vocabulary), "the most confident query's class"
    if isinstance(output, (list, tuple)) and output and all(isinstance(d, dict) and "scores" in d for d in output):
        return torch.stack([d["scores"].max() if d["scores"].numel() else d["scores"].sum() * 0 for d in output]), \
            "the most confident detection"
    emb = field(output, EMBEDDINGS)
    if emb is not None and emb.dim() == 2:
        unit = F.normalize(emb.detach(), dim=1)
        return (emb * unit).sum(1), "the embedding along its own direction"
    raise ValueError(f"target=None: the model returned a {describe(output)}, with no class logits ("
                     f"{', '.join(LOGITS)}), dense scores, detections or image embedding ({', '.join(EMBEDDINGS)}) to "
                     "explain; pass target=f(output) -> (N,) scores (ready-made: lightning_vis.targets.classifier(c, "
                     "key=...), segmentation, detection, similarity)")


__all__ = ["classifier", "default", "describe", "detection", "segmentation", "similarity"]
