"""Depthwise convolution with 'same' zero padding and an optionally fused exact GELU: the 3x3 convs of DAT++'s and
SMT's MLPs and of DAT++'s local perception units, whose maps (often the 4x expanded hidden maps) are among the
largest tensors of these networks."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._layers import eager_cpu_inference, gelu_
from ._extension import extension_status

__all__ = ["ResidualDepthwiseConv2d", "depthwise_conv2d"]


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     gelu: bool = False) -> torch.Tensor:
    """``conv(x)``, or ``gelu(conv(x))`` with ``gelu``, for a depthwise conv of stride 1 with an odd square kernel
    and 'same' zero padding.

    Args:
        x: (B, C, H, W) map.
        weight: (C, 1, k, k) with k odd.
        bias: (C,) or ``None``.
        gelu: apply exact (erf) GELU to the result.

    Eager float32 CPU inference on channels-last maps (which DAT++'s and SMT's maps are) runs the C++ kernel of the
    project's extension: conv, bias and GELU in one pass over the map. ``benchmarks/depthwise.py`` compares it with
    PyTorch's conv and GELU in sequence; over four runs on a noisy AVX-512 CPU: 1.1-1.7x on the MLP maps (with
    GELU), 1.0-1.6x on the maps of the local perception units (without). Autograd, other layouts, dtypes and devices,
    graphs being traced, compiled or exported, and builds without the extension run ``F.conv2d`` and ``F.gelu``; the
    two agree to float32 rounding.
    """
    kernel_size = weight.shape[-1]
    if kernel_size % 2 == 0 or weight.shape != (x.shape[1], 1, kernel_size, kernel_size):
        raise ValueError(f"weight must be (C, 1, k, k) with C = {x.shape[1]} channels of x and k odd, "
                         f"got {tuple(weight.shape)}")
    parameters = (weight,) if bias is None else (weight, bias)
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and eager_cpu_inference(x, *parameters) and extension_status("cpu")):
        return torch.ops.dat_smt_ext.depthwise_conv2d_forward(x, weight, bias, gelu)
    out = F.conv2d(x, weight, bias, padding=kernel_size // 2, groups=weight.shape[0])
    return gelu_(out) if gelu else out


class ResidualDepthwiseConv2d(nn.Conv2d):
    """``x + dwconv(x)`` for a 'same'-padded depthwise conv, followed by GELU with ``gelu=True``.

    Computed as one conv whose centre tap includes the identity, which saves a pass over the map; the parameters
    and state dict are those of the plain conv. See :func:`depthwise_conv2d` for the fused CPU inference path.
    """

    def __init__(self, dim: int, kernel_size: int = 3, gelu: bool = False):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.gelu = gelu
        identity = torch.zeros(dim, 1, kernel_size, kernel_size, device=self.weight.device)
        identity[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight + self.identity, self.bias, self.gelu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=True" if self.gelu else "")
