"""Registry and builder of the detectors: ``create_detector('deformable_detr', backbone='dat_tiny', ...)``."""
from typing import Any, Callable, Dict, List, Union

from torch import nn

__all__ = ["create_detector", "list_detectors", "register_detector"]

_DETECTORS: Dict[str, Callable[..., nn.Module]] = {}


def register_detector(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers ``fn(backbone, num_classes, pretrained_backbone, backbone_kwargs, **options)`` under ``name``.

    ``backbone`` is a timm model name or a built timm ``features_only`` model; the builder chooses the strides.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _DETECTORS:
            raise ValueError(f"detector {name!r} is already registered")
        _DETECTORS[name] = fn
        return fn

    return decorator


def list_detectors() -> List[str]:
    """Names accepted by :func:`create_detector`."""
    return sorted(_DETECTORS)


def create_detector(
        name: str,
        backbone: Union[str, nn.Module] = "resnet50",
        num_classes: int = 91,
        pretrained_backbone: bool = False,
        backbone_kwargs: Dict[str, Any] | None = None,
        **options: Any,
) -> nn.Module:
    """Builds detector ``name`` on a timm backbone.

    Args:
        name: A registered detector (see :func:`list_detectors`).
        backbone: timm model name (any model supporting ``features_only``, e.g. ``'dat_tiny'``, ``'resnet50'``)
            or an already built ``features_only`` model.
        num_classes: Object classes (sigmoid logits).
        pretrained_backbone: Load timm's pretrained backbone weights.
        backbone_kwargs: Extra ``TimmBackbone`` / ``timm.create_model`` arguments (e.g. ``trainable_stages``).
        **options: Detector options (e.g. ``num_feature_levels``, ``with_box_refine``, ``two_stage``).
    """
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {list_detectors()}")
    return _DETECTORS[name](
        backbone=backbone,
        num_classes=num_classes,
        pretrained_backbone=pretrained_backbone,
        backbone_kwargs=dict(backbone_kwargs or {}),
        **options,
    )
