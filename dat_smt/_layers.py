"""Layers shared by the DAT and SMT models."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResidualDepthwiseConv2d", "caching_allowed"]


class ResidualDepthwiseConv2d(nn.Conv2d):
    """``x + dwconv(x)`` for a 'same'-padded depthwise conv, computed as one conv whose centre tap includes the
    identity, which saves a pass over the (often 4x expanded) map. Parameters are those of the plain conv."""

    def __init__(self, dim: int, kernel_size: int = 3):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        identity = torch.zeros(dim, 1, kernel_size, kernel_size, device=self.weight.device)
        identity[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.identity, self.bias, padding=self.padding, groups=self.groups)


def caching_allowed() -> bool:
    """Whether size-keyed tensor caches may be filled: not while tracing, compiling or exporting, where the
    tensors are graph values (or fake) rather than data."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())
