"""Adapter turning any timm ``features_only`` model into a detection backbone with per-level padding masks."""
import math
from collections import Counter
from typing import Any, List, Mapping, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, freeze_batch_norm_2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from dat_smt._layers import batchnorm_affine, fold_batchnorm, grad_free

__all__ = [
    "FoldedFrozenBatchNorm2d", "FrozenBatchNorm2d", "FrozenBatchNormConv2d", "TimmBackbone", "build_backbone",
    "fold_frozen_batch_norm", "mask_to_size",
]


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers and result) applied in one pass over the map.

    ``bias + x * scale`` by ``torch.addcmul`` writes one output instead of the product and then the sum: at
    detection resolutions the ResNet-50 maps add up to about 1 GB, so the second pass is a noticeable cost.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = batchnorm_affine(self)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


def _one_pass_frozen_batch_norm(module: nn.Module) -> nn.Module:
    """Replaces every torchvision ``FrozenBatchNorm2d`` below ``module`` by :class:`FrozenBatchNorm2d`."""
    if type(module) is TorchvisionFrozenBatchNorm2d:
        frozen = FrozenBatchNorm2d(module.weight.shape[0], eps=module.eps)
        frozen.load_state_dict(module.state_dict())
        return frozen
    for name, child in module.named_children():
        new_child = _one_pass_frozen_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A :class:`FrozenBatchNorm2d` whose normalisation its :class:`FrozenBatchNormConv2d` applies: it passes its
    input through and only keeps the buffers (and their state-dict keys) where they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenBatchNormConv2d(nn.Conv2d):
    """A ``Conv2d`` followed by a frozen BatchNorm, computed as one convolution.

    The frozen affine map ``x * scale + shift`` folds into the convolution: weights ``w * scale`` (per output
    channel) and bias ``b * scale + shift``, computed from the live parameters and buffers at every call, so
    trainable convolution weights get their gradients through the scaling and loaded checkpoints apply at once.
    One pass over the output instead of two, and no second map of the output's size.

    The convolution shares the parameters of the ``Conv2d`` it replaces (same state-dict keys) and reads the
    buffers of ``batch_norm``, which stays registered where it was (as a :class:`FoldedFrozenBatchNorm2d`).
    """

    def __init__(self, conv: nn.Conv2d, batch_norm: FrozenBatchNorm2d):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)
        # Not a submodule: the BatchNorm keeps its place (and state-dict keys) in the parent module.
        object.__setattr__(self, "frozen_batch_norm", batch_norm)
        self._folded: Tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def folded_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of the folded convolution, differentiable in the convolution's parameters.

        Without autograd (inference, or frozen convolutions) they are computed once and kept until a parameter
        or buffer changes (in place, or replaced): folding all of ResNet-50's weights at every call costs about
        as much as the BatchNorm passes over the maps it saves at small input sizes.
        """
        bn = self.frozen_batch_norm
        sources = [t for t in (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
                   if t is not None]
        # The tensors themselves (kept alive by the cache, so their ids stay theirs), their in-place version
        # counters and storages (``module.to`` swaps ``.data``).
        key = [(t, t._version, t.data_ptr(), t.dtype, t.device) for t in sources] if grad_free(*sources) else None
        if key is not None and self._folded is not None and _same_tensors(self._folded[0], key):
            return self._folded[1], self._folded[2]
        weight, shift = fold_batchnorm(self.weight, self.bias, bn)
        self._folded = None if key is None else (key, weight, shift)
        return weight, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded_weight_and_bias()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _same_tensors(a: List[Tuple[Any, ...]], b: List[Tuple[Any, ...]]) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b))


def _conv_then_frozen_bn_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, BatchNorm name) of every plain ``Conv2d`` whose output goes straight into a frozen BatchNorm
    (no other call between them), seen on one forward; modules called more than once are left out."""
    calls: List[Tuple[str, torch.Tensor, torch.Tensor]] = []

    def record(name):
        def hook(module, inputs, output):
            calls.append((name, inputs[0], output))
        return hook

    handles = [
        module.register_forward_hook(record(name)) for name, module in model.named_modules()
        if (type(module) is nn.Conv2d and module.padding_mode == "zeros") or type(module) is FrozenBatchNorm2d
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    counts = Counter(name for name, _, _ in calls)
    modules = dict(model.named_modules())
    pairs = []
    for (conv_name, _, conv_out), (bn_name, bn_in, _) in zip(calls, calls[1:]):
        conv, bn = modules[conv_name], modules[bn_name]
        if (type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d and bn_in is conv_out
                and counts[conv_name] == counts[bn_name] == 1 and conv.out_channels == bn.weight.numel()):
            pairs.append((conv_name, bn_name))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def fold_frozen_batch_norm(model: nn.Module, example: torch.Tensor) -> int:
    """Folds every frozen BatchNorm that directly follows a ``Conv2d`` into it (:class:`FrozenBatchNormConv2d`).

    The pairs are found by running ``model`` once on ``example``; they are folded only if the folded model then
    gives the same output (with the BatchNorms made non-trivial for the check), else nothing is folded: a
    convolution whose raw output is also read elsewhere must keep it. Parameters, buffers and state-dict keys stay
    the same. Returns the number of folded pairs.
    """
    was_training = model.training
    model.eval()
    try:
        pairs = _conv_then_frozen_bn_pairs(model, example)
        if not pairs:
            return 0
        modules = dict(model.named_modules())
        # Compared with BatchNorms that are not the identity (fresh ones almost are), so that a raw convolution
        # output read elsewhere, too, shows up as a difference.
        buffers = [buffer for _, bn_name in pairs for buffer in modules[bn_name].buffers()]
        saved = [buffer.clone() for buffer in buffers]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, bn_name in pairs:
                bn = modules[bn_name]
                bn.weight.mul_(torch.rand(bn.weight.shape, generator=generator).add_(0.5))
                bn.running_mean.add_(torch.rand(bn.weight.shape, generator=generator).sub_(0.5))
            expected = model(example)
            for conv_name, bn_name in pairs:
                bn = modules[bn_name]
                folded_bn = FoldedFrozenBatchNorm2d(bn.weight.numel(), eps=bn.eps)
                for key, buffer in bn.named_buffers():
                    setattr(folded_bn, key, buffer)
                _set_submodule(model, bn_name, folded_bn)
                _set_submodule(model, conv_name, FrozenBatchNormConv2d(modules[conv_name], folded_bn))
            actual = model(example)
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        if not all(torch.allclose(a, e, rtol=1e-4, atol=1e-4) for a, e in zip(_flat(actual), _flat(expected))):
            for conv_name, bn_name in pairs:
                _set_submodule(model, bn_name, modules[bn_name])
                _set_submodule(model, conv_name, modules[conv_name])
            return 0
        return len(pairs)
    finally:
        model.train(was_training)


def _example_input(model: nn.Module) -> torch.Tensor:
    """A small input that ``model`` runs on: its pretrained size when the model needs it, else 64 x 64."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[-2:]) if cfg.get("fixed_input_size", False) else (64, 64)
    reference = next(iter(model.parameters()), torch.empty(0))
    return torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(0)).to(reference)


def _flat(output: Any) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    return [t for item in output for t in _flat(item)]


def _input_size_divisor(model: nn.Module) -> int:
    """What input heights and widths must be multiples of: timm patch embeddings that do not pad need whole patches."""
    divisor = 1
    for module in model.modules():
        patch_size = getattr(module, "patch_size", None)
        if isinstance(module, PatchEmbed) and not module.dynamic_img_pad and patch_size is not None:
            for size in (patch_size, patch_size) if isinstance(patch_size, int) else patch_size:
                divisor = math.lcm(divisor, int(size))
    return divisor


class TimmBackbone(nn.Module):
    """The maps of chosen strides of a timm ``features_only`` model, as NCHW tensors with padding masks.

    Args:
        model: A timm model name (built here with ``features_only=True``) or an already built features-only
            model (anything with a timm ``feature_info``).
        out_strides: Strides of the returned maps, matched against ``feature_info.reduction()``.
        pretrained: Load the timm pretrained weights (only when ``model`` is a name).
        freeze_bn: Replace every ``BatchNorm2d`` by a :class:`FrozenBatchNorm2d` (running statistics and affine
            parameters fixed), as detection training with small batches does.
        trainable_stages: How many of the last feature stages train; everything before them (stem and early
            stages) is frozen. ``None`` trains the stages of stride 8 and more and freezes the stem and the
            stride-4 stage (the official ResNet setting: layer2-4 train); ``-1`` trains everything; 0 freezes all.
        channels_last: Run the body on channels-last (NHWC) input, which makes oneDNN's CPU convolutions of
            CNNs such as ResNet faster; the returned maps may then be channels-last strided.
        fold_frozen_bn: Fold every frozen BatchNorm that directly follows a convolution into it
            (:func:`fold_frozen_batch_norm`; same results, parameters and state-dict keys, one pass less over
            every such map).
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``strict_img_size=False`` for Swin).

    Attributes:
        strides: Stride of every returned map.
        size_divisibility: What padded batches must be multiples of: 1, or the patch size of timm patch embeddings
            that do not pad (e.g. 4 for Swin).
        channels: Channels of every returned map.
        body: The wrapped timm model; its parameters are ``body.<timm name>``.
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            out_strides: Sequence[int] = (8, 16, 32),
            pretrained: bool = False,
            freeze_bn: bool = True,
            trainable_stages: int | None = None,
            channels_last: bool = False,
            fold_frozen_bn: bool = True,
            **timm_kwargs,
    ):
        super().__init__()
        if isinstance(model, str):
            model = _create_features_model(model, pretrained, **timm_kwargs)
        elif timm_kwargs or pretrained:
            raise ValueError("pretrained and timm keyword arguments only apply when the backbone is given by name")
        feature_info = getattr(model, "feature_info", None)
        if feature_info is None or not hasattr(feature_info, "reduction"):
            raise TypeError(
                f"the backbone must be a timm features_only model (with feature_info), got {type(model).__name__}; "
                "build it with timm.create_model(name, features_only=True)"
            )
        reductions = list(feature_info.reduction())
        missing = [s for s in out_strides if s not in reductions]
        if missing:
            raise ValueError(f"the backbone has no feature map of stride {missing}; its strides are {reductions}")
        # The deepest map of each requested stride (a dilated stage repeats its predecessor's stride).
        self.feature_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in out_strides]
        self.strides = [reductions[i] for i in self.feature_indices]
        self.channels = [feature_info.channels()[i] for i in self.feature_indices]
        fmt = getattr(model, "output_fmt", "NCHW")
        self.channels_last_output = getattr(fmt, "value", fmt) == "NHWC"
        if freeze_bn:
            model = _one_pass_frozen_batch_norm(freeze_batch_norm_2d(model))
        if fold_frozen_bn and any(type(m) is FrozenBatchNorm2d for m in model.modules()):
            fold_frozen_batch_norm(model, _example_input(model))
        self.body = model
        self.channels_last = channels_last
        self.size_divisibility = _input_size_divisor(model)
        self._freeze_early_stages(feature_info.module_name(), reductions, trainable_stages)

    def _freeze_early_stages(self, stage_names: List[str], reductions: List[int], trainable_stages: int | None) -> None:
        if trainable_stages == -1:
            return
        if trainable_stages is None:
            first_trainable = next((i for i, r in enumerate(reductions) if r >= 8), 0)
        else:
            if trainable_stages < 0 or trainable_stages > len(stage_names):
                raise ValueError(f"trainable_stages must be -1 or in [0, {len(stage_names)}], got {trainable_stages}")
            first_trainable = len(stage_names) - trainable_stages
        prefixes = tuple(name.replace(".", "_") + "." for name in stage_names[first_trainable:])
        prefixes += tuple(name + "." for name in stage_names[first_trainable:])
        for name, param in self.body.named_parameters():
            if not name.startswith(prefixes):
                param.requires_grad_(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(B, 3, H, W) images and (B, H, W) padding mask -> NCHW maps and their (B, h, w) masks, one per stride."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        maps, masks = [], []
        for i in self.feature_indices:
            x = features[i]
            if self.channels_last_output:
                x = x.permute(0, 3, 1, 2)
            maps.append(x)
            masks.append(mask_to_size(mask, x.shape[-2:]))
        return maps, masks


def build_backbone(
        backbone: Union[str, nn.Module],
        out_strides: Sequence[int] = (8, 16, 32),
        pretrained: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
) -> TimmBackbone:
    """The backbone of a detector builder (``create_detector(..., backbone=..., pretrained_backbone=...)``).

    Args:
        backbone: A timm model name, a built timm ``features_only`` model, or a :class:`TimmBackbone` (returned
            as it is).
        out_strides: The strides the detector reads, unless ``backbone_kwargs`` names its own ``out_strides``.
        pretrained: Load timm's pretrained weights; only for a backbone given by name.
        backbone_kwargs: :class:`TimmBackbone` options (``out_strides``, ``freeze_bn``, ``trainable_stages``) and
            ``timm.create_model`` keyword arguments.
    """
    kwargs = dict(backbone_kwargs or {})
    if isinstance(backbone, TimmBackbone):
        if kwargs or pretrained:
            raise ValueError(
                "pretrained_backbone and backbone_kwargs apply when the backbone is given by name or as a timm "
                "model, not to an already built TimmBackbone"
            )
        return backbone
    if not isinstance(backbone, str) and pretrained:
        raise ValueError("pretrained_backbone only applies when the backbone is given by name")
    out_strides = kwargs.pop("out_strides", out_strides)
    if isinstance(backbone, str):
        kwargs["pretrained"] = pretrained
    return TimmBackbone(backbone, out_strides=out_strides, **kwargs)


def _create_features_model(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """``timm.create_model(features_only=True)``, accepting any input size where the model supports it (Swin)."""
    if "strict_img_size" not in kwargs:
        try:
            return timm.create_model(name, features_only=True, pretrained=pretrained, strict_img_size=False, **kwargs)
        except TypeError as e:
            if "strict_img_size" not in str(e):
                raise
    return timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)


def mask_to_size(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) bool padding mask to ``size`` (the map's actual size)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
