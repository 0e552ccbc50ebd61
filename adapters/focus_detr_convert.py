"""Converters from the official Focus-DETR (torch/detrex) checkpoints onto the dat_smt modules.

The official encoder side lives under ``transformer.`` (``level_embeds``, ``enc_output``, ``enc_output_norm``,
``enc_mask_predictor``, ``alpha``, ``encoder.layers.<i>.{attentions,ffns,norms,norm2}``); the ResNet-50 backbone
uses detectron2 names (``backbone.stem.conv1``, ``backbone.res<k>.<i>.conv<j>(.norm)``, ``shortcut``).
Every converter ends in :func:`dat_smt._checkpoint.check_state_dict` when given a target model.
"""
import re
from collections.abc import Mapping

import torch
from torch import nn

from dat_smt._checkpoint import check_state_dict

__all__ = [
    "convert_focus_encoder_state_dict",
    "convert_detectron2_resnet_state_dict",
    "convert_official_focus_detr_state_dict",
]

_ENCODER_TOP_LEVEL = {
    "level_embeds": "level_embed",
    "alpha": "selector.alpha",
    "enc_output.weight": "input_proj.weight",
    "enc_output.bias": "input_proj.bias",
    "enc_output_norm.weight": "input_norm.weight",
    "enc_output_norm.bias": "input_norm.bias",
}
_SCORER = {
    "layer1.0": "embed.0", "layer1.1": "embed.1", "layer2.0": "head.0", "layer2.2": "head.2", "layer2.4": "head.4",
}
_ENCODER_LAYER = {
    "attentions.0.attn": "self_attn",
    "norm2": "self_attn_norm",
    "attentions.1": "cross_attn",
    "norms.0": "norm1",
    "norms.1": "norm2",
    "ffns.0.layers.0.0": "linear1",
    "ffns.0.layers.1": "linear2",
}


def _rename_prefix(key: str, modules: Mapping[str, str]) -> str | None:
    """``key`` with its official module prefix (the first of ``modules`` it starts with) renamed; None if none."""
    for official, ours in modules.items():
        if key.startswith(official + "."):
            return ours + key[len(official):]
    return None


def _rename_encoder_key(key: str) -> str | None:
    if key in _ENCODER_TOP_LEVEL:
        return _ENCODER_TOP_LEVEL[key]
    match = re.fullmatch(r"enc_mask_predictor\.(layer\d\.\d)\.(weight|bias)", key)
    if match and match.group(1) in _SCORER:
        return f"selector.scorer.{_SCORER[match.group(1)]}.{match.group(2)}"
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if match:
        renamed = _rename_prefix(match.group(2), _ENCODER_LAYER)
        return None if renamed is None else f"layers.{match.group(1)}.{renamed}"
    return None


def convert_focus_encoder_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        prefix: str = "transformer.",
        model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Official encoder-side keys (under ``prefix``) -> :class:`FocusEncoder` keys.

    Keys outside the encoder side (decoder, heads, backbone) are ignored; ``model`` enables the strict check.
    """
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        new_key = _rename_encoder_key(key[len(prefix):])
        if new_key is not None:
            converted[new_key] = value
    if model is not None:
        check_state_dict(converted, model, "official Focus-DETR encoder")
    return converted


def convert_detectron2_resnet_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        prefix: str = "backbone.",
        model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """detectron2 ResNet (FrozenBN, stride on the 3x3 conv as in torchvision) -> timm ``resnet`` keys.

    ``stem.conv1`` -> ``conv1``/``bn1``; ``res<k>.<i>.conv<j>`` -> ``layer<k-1>.<i>.conv<j>``/``bn<j>``;
    ``shortcut`` -> ``downsample.0``/``downsample.1``. BatchNorm counters the FrozenBN lacks are set to 0.
    """
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        match = re.fullmatch(r"stem\.conv1\.(norm\.)?(\w+)", key)
        if match:
            converted[("bn1." if match.group(1) else "conv1.") + match.group(2)] = value
            continue
        match = re.fullmatch(r"res(\d)\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(\w+)", key)
        if not match:
            continue
        stage, block, conv, is_norm, name = match.groups()
        if conv == "shortcut":
            module = "downsample.1" if is_norm else "downsample.0"
        else:
            module = conv.replace("conv", "bn") if is_norm else conv
        converted[f"layer{int(stage) - 1}.{block}.{module}.{name}"] = value
    for key in [k for k in converted if k.endswith(".running_var")]:
        converted.setdefault(key.replace("running_var", "num_batches_tracked"), torch.zeros((), dtype=torch.long))
    if model is not None:
        check_state_dict(converted, model, "detectron2 ResNet")
    return converted


_DECODER_LAYER = {
    "attentions.0.attn": "self_attn",
    "attentions.1": "cross_attn",
    "norms.0": "norm1",
    "norms.1": "norm2",
    "norms.2": "norm3",
    "ffns.0.layers.0.0": "linear1",
    "ffns.0.layers.1": "linear2",
}
_DETECTOR_MODULES = {
    "transformer.decoder.ref_point_head": "decoder.ref_point_head",
    "transformer.decoder.norm": "decoder.norm",
    "transformer.tgt_embed": "tgt_embed",
    "label_enc": "denoising.label_embed",
    "class_embed": "class_embed",
    "bbox_embed": "bbox_embed",
}


def _rename_detector_key(key: str, num_backbone_levels: int) -> str | None:
    """Official non-backbone, non-encoder keys -> :class:`FocusDETR` keys (None: alias or unused)."""
    match = re.fullmatch(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(\w+)", key)
    if match:
        kind, index, part, name = match.groups()
        level = int(index) + (num_backbone_levels if kind == "extra_convs" else 0)
        return f"input_proj.{level}.{0 if part == 'conv' else 1}.{name}"
    match = re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.(.+)", key)
    if match:
        renamed = _rename_prefix(match.group(2), _DECODER_LAYER)
        return None if renamed is None else f"decoder.layers.{match.group(1)}.{renamed}"
    return _rename_prefix(key, _DETECTOR_MODULES)


def convert_official_focus_detr_state_dict(
        state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The official detrex Focus-DETR checkpoint (ResNet-50) -> :class:`FocusDETR` keys, checked strictly.

    detectron2 ResNet -> ``backbone.body.*`` (timm resnet50); ``neck.convs.<i>`` / ``neck.extra_convs.<j>``
    (ChannelMapper conv + GroupNorm) -> ``input_proj``; encoder side -> ``encoder.*``; decoder layers, query
    positional MLP, final norm, ``tgt_embed``, ``label_enc`` (denoising labels) and the per-layer heads follow.
    The decoder's aliases of the heads (``transformer.decoder.class_embed`` / ``bbox_embed``) are dropped.
    """
    converted = {
        "backbone.body." + k: v for k, v in convert_detectron2_resnet_state_dict(state_dict).items()
    }
    converted.update({"encoder." + k: v for k, v in convert_focus_encoder_state_dict(state_dict).items()})
    num_backbone_levels = len(model.backbone.channels)
    for key, value in state_dict.items():
        new_key = _rename_detector_key(key, num_backbone_levels)
        if new_key is not None:
            converted[new_key] = value
    expected = model.state_dict()
    # BatchNorm counters exist only when the backbone keeps trainable BatchNorm (not FrozenBatchNorm2d).
    converted = {k: v for k, v in converted.items() if not k.endswith("num_batches_tracked") or k in expected}
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    check_state_dict(converted, model, "official Focus-DETR checkpoint")
    return converted
