"""LayerNorm over the channels of channels-last maps and token rows: DAT's and SMT's norms, on whose short rows
(32-512 channels) PyTorch's CPU kernel takes 2-5x the time of a copy of the map."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d as _TimmLayerNorm2d

from .._layers import eager_cpu_inference
from ._extension import extension_status

__all__ = ["LayerNorm", "LayerNorm2d", "layer_norm"]


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    parameters = tuple(t for t in (weight, bias) if t is not None)
    return (x.numel() > 0 and x.is_contiguous() and eager_cpu_inference(x, *parameters)
            and extension_status("cpu"))


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension of ``x``.

    Eager float32 CPU inference on a contiguous ``x`` runs the C++ kernel of the project's extension;
    ``benchmarks/layer_norm.py`` compares it with PyTorch's on the maps of these networks, over four runs on a noisy
    AVX-512 CPU: 1.7-2.1x at 32 channels, 1.5-2.0x at 64, 1.3-1.7x at 128, 1.2-1.3x at 256, 0.9-1.1x at 512. The two
    agree to float32 rounding. Autograd, other layouts, dtypes and devices, graphs being traced, compiled or exported,
    and builds without the extension run ``F.layer_norm``.
    """
    if _kernel_applies(x, weight, bias):
        return torch.ops.dat_smt_ext.layer_norm_forward(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same arguments, parameters and state dict) that normalises over the last dimension with
    :func:`layer_norm`'s kernel where it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # other shapes go to PyTorch, which also reports inputs that do not end in normalized_shape
        if x.shape[-1:] == self.normalized_shape:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class LayerNorm2d(_TimmLayerNorm2d):
    """timm's ``LayerNorm2d`` (LayerNorm over the channels of an NCHW map; same arguments, parameters and state dict)
    with :func:`layer_norm`'s kernel where it applies, which reads channels-last maps without a copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 2, 3, 1)
        if pixels.shape[-1:] == self.normalized_shape and _kernel_applies(pixels, self.weight, self.bias):
            out = torch.ops.dat_smt_ext.layer_norm_forward(pixels, self.weight, self.bias, self.eps)
            return out.permute(0, 3, 1, 2)
        return super().forward(x)
