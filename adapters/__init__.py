"""DETR-family detection adapters over the ``features_only`` pyramid of any timm backbone.

Installed and imported as ``dat_smt.adapters``::

    from dat_smt.adapters import create_detector
    model = create_detector("deformable_detr", backbone="resnet50", num_classes=80, with_box_refine=True)

Shared toolkit (stable API used by every detector): :class:`TimmBackbone`, :func:`batch_images`,
:class:`PositionEmbeddingSine` / :func:`box_sine_embedding`, :class:`HungarianMatcher`, :class:`SetCriterion`,
:class:`DetrDetector` (torchvision calling convention), :func:`create_detector` / :func:`register_detector` /
:func:`list_detectors`, :func:`evaluate_coco`.
"""
from .backbone import TimmBackbone, build_backbone, mask_to_size
from .coco_eval import evaluate_coco
from .criterion import SetCriterion, deformable_detr_weight_dict
from .deformable_detr import (
    DeformableDETR,
    DeformableTransformer,
    checkpoint_filter_fn,
    convert_official_checkpoint,
    encoder_proposals,
    encoder_reference_points,
    flatten_levels,
)
from .detector import DetrDetector
from .focus_detr import FocusCriterion, FocusDETR, focus_detr_weight_dict
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine, box_sine_embedding
from .registry import create_detector, list_detectors, register_detector
from .smca import SMCADETR, SMCAHead, SMCAMultiScaleDETR, SMCATransformer, convert_smca_checkpoint
from .utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MLP,
    batch_images,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    clones,
    inverse_sigmoid,
    valid_ratios_from_mask,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "DeformableDETR",
    "DeformableTransformer",
    "DetrDetector",
    "FocusCriterion",
    "FocusDETR",
    "HungarianMatcher",
    "PositionEmbeddingSine",
    "SMCADETR",
    "SMCAHead",
    "SMCAMultiScaleDETR",
    "SMCATransformer",
    "SetCriterion",
    "TimmBackbone",
    "batch_images",
    "box_cxcywh_to_xyxy",
    "box_sine_embedding",
    "box_xyxy_to_cxcywh",
    "build_backbone",
    "checkpoint_filter_fn",
    "clones",
    "convert_official_checkpoint",
    "convert_smca_checkpoint",
    "create_detector",
    "deformable_detr_weight_dict",
    "encoder_proposals",
    "encoder_reference_points",
    "evaluate_coco",
    "focus_detr_weight_dict",
    "flatten_levels",
    "inverse_sigmoid",
    "list_detectors",
    "mask_to_size",
    "register_detector",
    "valid_ratios_from_mask",
]
