"""Base class giving DETR-family detectors the torchvision detection API."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .backbone import TimmBackbone
from .criterion import SetCriterion
from .utils import IMAGENET_MEAN, IMAGENET_STD, Images, batch_images, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["DetrDetector"]

Target = Dict[str, torch.Tensor]


class DetrDetector(nn.Module):
    """A set-prediction detector with the torchvision calling convention.

    ``model(images)`` in eval mode returns, per image, ``{"boxes": (K, 4) absolute xyxy in that image's pixel
    coordinates, "scores": (K,), "labels": (K,) int64 0-based}`` for the ``num_detections`` best (query, class)
    pairs. ``model(images, targets)`` in train mode returns the dict of WEIGHTED losses (sum them to train).

    ``images`` is a list of (3, H, W) float tensors in [0, 1] of any sizes or a padded (B, 3, H, W) batch;
    normalisation happens inside. ``targets`` is a list of dicts with ``boxes`` (T, 4) absolute (x1, y1, x2, y2)
    and ``labels`` (T,) integers in ``[0, num_classes)``; images without objects have T = 0. Boxes are clipped
    to their image; zero-width or zero-height boxes are kept (they give finite losses); boxes with x2 < x1 or
    y2 < y1, non-finite boxes and out-of-range labels raise ``ValueError``.

    Subclasses implement :meth:`forward_detr` (normalised padded batch + mask -> raw outputs: ``pred_logits``
    (B, Q, C), ``pred_boxes`` (B, Q, 4) sigmoid cxcywh relative to the unpadded image, optional
    ``aux_outputs`` / ``enc_outputs``); detectors that use the training targets inside the model (denoising
    queries, token-selector supervision) override :meth:`forward_outputs` as well.

    Args:
        backbone: The feature extractor.
        num_classes: Number of object classes (sigmoid logits; no background class).
        criterion: Losses used in training; ``criterion.weight_dict`` weights them.
        num_detections: Detections kept per image in eval mode.
        size_divisibility: Padded batch sizes are multiples of it. The default (None) takes the backbone's
            ``size_divisibility``: 1 for any backbone that runs at any size, which pads to the largest image only, as
            the official Deformable DETR, SMCA and Focus-DETR pipelines do (extra padding changes border features,
            level sizes and, with two-stage, the selected proposals); the patch size for timm patch embeddings that
            need whole patches (Swin).
        image_mean: Normalisation mean of [0, 1] RGB images.
        image_std: Normalisation std.
    """

    def __init__(
            self,
            backbone: TimmBackbone,
            num_classes: int,
            criterion: SetCriterion,
            num_detections: int = 100,
            size_divisibility: int | None = None,
            image_mean: Sequence[float] = IMAGENET_MEAN,
            image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.criterion = criterion
        self.num_detections = num_detections
        if size_divisibility is None:
            size_divisibility = getattr(backbone, "size_divisibility", 1)
        self.size_divisibility = size_divisibility
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def forward_detr(self, images: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Normalised (B, 3, H, W) images and (B, H, W) padding mask -> raw predictions."""
        raise NotImplementedError

    def forward_outputs(
            self, images: torch.Tensor, mask: torch.Tensor, targets: Sequence[Target] | None,
            image_sizes: Sequence[Tuple[int, int]],
    ) -> Dict[str, torch.Tensor]:
        """Raw predictions of :meth:`forward`: ``targets`` are the prepared (normalised cxcywh) training targets,
        None in eval mode; ``image_sizes`` the unpadded (height, width) of every image. Calls
        :meth:`forward_detr`, which needs neither."""
        return self.forward_detr(images, mask)

    def forward(self, images: Images, targets: Sequence[Target] | None = None):
        """Losses (training, with targets) or detections (eval); see the class docstring."""
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode (call model.eval() for detections)")
        batch, mask, sizes = batch_images(images, self.size_divisibility)
        normalized_targets = self.prepare_targets(targets, sizes, batch.device) if targets is not None else None
        batch = self.normalize_images(batch, mask)
        outputs = self.forward_outputs(batch, mask, normalized_targets if self.training else None, sizes)
        if self.training:
            losses = self.criterion(outputs, normalized_targets)
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        return self.postprocess(outputs, sizes)

    def normalize_images(self, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalises a zero-padded [0, 1] batch; padding stays 0 (the official pipelines normalise, then pad)."""
        batch = (batch - self.image_mean.to(batch.dtype)) / self.image_std.to(batch.dtype)
        return batch.masked_fill(mask[:, None], 0.0)

    def prepare_targets(
            self, targets: Sequence[Target], image_sizes: Sequence[Tuple[int, int]], device: torch.device
    ) -> List[Target]:
        """Checks absolute-xyxy targets and converts them to boxes in normalised (cx, cy, w, h)."""
        if not isinstance(targets, (list, tuple)) or len(targets) != len(image_sizes):
            raise ValueError(f"targets must be a list with one dict per image ({len(image_sizes)}), got {targets!r}")
        prepared = []
        for i, (target, (h, w)) in enumerate(zip(targets, image_sizes)):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            labels = torch.as_tensor(target["labels"], device=device).reshape(-1)
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise TypeError(f"targets[{i}]['labels'] must be integers, got {labels.dtype}")
            labels = labels.to(torch.int64)
            if len(boxes) != len(labels):
                raise ValueError(f"targets[{i}] has {len(boxes)} boxes but {len(labels)} labels")
            if not torch.isfinite(boxes).all():
                raise ValueError(f"targets[{i}]['boxes'] contains NaN or infinite values")
            if (boxes[:, 2:] < boxes[:, :2]).any():
                raise ValueError(f"targets[{i}]['boxes'] must be absolute (x1, y1, x2, y2) with x2 >= x1, y2 >= y1")
            if ((labels < 0) | (labels >= self.num_classes)).any():
                raise ValueError(
                    f"targets[{i}]['labels'] must be in [0, {self.num_classes}), got {labels.unique().tolist()}"
                )
            scale = boxes.new_tensor([w, h, w, h])
            boxes = torch.minimum(boxes.clamp(min=0), scale)
            prepared.append({"boxes": box_xyxy_to_cxcywh(boxes / scale), "labels": labels})
        return prepared

    @torch.no_grad()
    def postprocess(self, outputs: Dict[str, torch.Tensor], image_sizes: Sequence[Tuple[int, int]]) -> List[Target]:
        """Top ``num_detections`` (query, class) pairs per image by sigmoid score, boxes in absolute xyxy."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_queries, num_classes = logits.shape[1:]
        scores, flat_idx = logits.sigmoid().flatten(1).topk(min(self.num_detections, num_queries * num_classes), 1)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes
        boxes = box_cxcywh_to_xyxy(torch.gather(boxes, 1, query_idx[..., None].expand(-1, -1, 4)))
        results = []
        for b, (h, w) in enumerate(image_sizes):
            scale = boxes.new_tensor([w, h, w, h])
            abs_boxes = torch.minimum((boxes[b] * scale).clamp(min=0), scale)
            results.append({"boxes": abs_boxes, "scores": scores[b], "labels": labels[b]})
        return results

    def set_msda_backend(self, backend: str) -> None:
        """Sets the ``backend`` of every multi-scale deformable attention module (``"auto"``, ``"cpp"``, ...)."""
        for module in self.modules():
            if hasattr(module, "backend") and hasattr(module, "sampling_offsets"):
                module.backend = backend
