"""Layers shared by the DAT and SMT models."""
import math
from collections import OrderedDict
from typing import Any, Callable, Hashable, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GELU", "Linear", "SizeCache", "batchnorm_affine", "caching_allowed", "eager_cpu_inference",
    "fold_batchnorm", "gelu", "gelu_", "grad_free", "in_batch_slices", "linear",
]


def caching_allowed() -> bool:
    """Whether size-keyed tensor caches may be filled: not while tracing, compiling or exporting, where the
    tensors are graph values (or fake) rather than data."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


T = TypeVar("T")


class SizeCache:
    """Tensors that depend on sizes only (masks, index tables, grids), built on first use and kept for the
    ``max_entries`` most recently used keys; nothing is stored where :func:`caching_allowed` says no."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            return value
        value = build()
        if caching_allowed():
            self._entries[key] = value
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value


def grad_free(*tensors: torch.Tensor) -> bool:
    """Whether no gradient will flow through ``tensors``, so that any in-place update of them is safe."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _dense_view(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for a channels-last map its memory as a contiguous (B, H, W, C) tensor: PyTorch's CPU GELU takes a
    scalar loop over channels-last strides, 2-2.5x slower than its vectorised loop over contiguous memory."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (exact), run over the dense memory of channels-last maps; the result keeps ``x``'s layout."""
    dense = _dense_view(x)
    out = F.gelu(dense)
    return out if dense is x else out.permute(0, 3, 1, 2)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """GELU of a tensor the caller owns, in place when no gradient flows through it and the code runs eagerly
    (graphs being traced, compiled or exported are kept functional): the MLP hidden maps are the largest tensors
    of these networks, and every fresh page of a second one costs a page fault."""
    if grad_free(x) and caching_allowed():
        torch.ops.aten.gelu_(_dense_view(x))
        return x
    return gelu(x)


class GELU(nn.GELU):
    """``nn.GELU`` (exact) through :func:`gelu`, for the channels-last maps of these networks; with ``inplace``
    through :func:`gelu_`, for inputs no other layer reads (a norm's output)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_(x) if self.inplace else gelu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


def eager_cpu_inference(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` are float32 CPU tensors through which no gradient flows, in eager code: where the CPU
    inference kernels (oneDNN's matmul, the extension's) may stand in for the autograd-aware formulations."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and grad_free(*tensors)
            and caching_allowed())


_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; in eager float32 inference on the CPU through oneDNN's matmul (the kernel PyTorch's compiler
    picks for frozen CPU graphs), which runs these networks' projections (tall token matrices, narrow outputs)
    faster than the BLAS call behind ``F.linear``. Results agree to float32 rounding. Training, autograd and
    graphs being traced, compiled or exported keep ``F.linear``."""
    if _onednn_linear is not None and eager_cpu_inference(*(t for t in (x, weight, bias) if t is not None)):
        return _onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that runs through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def batchnorm_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with which ``bn`` in eval mode (or frozen) maps ``x`` to ``x * scale + shift``.

    ``bn`` is any BatchNorm-like module with ``running_mean``, ``running_var``, ``eps`` and a ``weight`` and ``bias``
    that may be ``None`` (no affine). Built from the live tensors, so gradients reach trainable affine parameters.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a conv followed by ``bn`` in eval mode, as one conv (built from the parameters on every
    call, so that gradients reach the conv and the BN affine parameters as through the two layers)."""
    scale, shift = batchnorm_affine(bn)
    if bias is not None:
        shift = torch.addcmul(shift, bias, scale)
    return weight * scale.reshape(-1, *([1] * (weight.ndim - 1))), shift


SLICE_BYTES = 16 << 20


def in_batch_slices(forward: Callable[..., torch.Tensor], x: torch.Tensor, expansion: float,
                    *args) -> torch.Tensor:
    """``forward(x, *args)`` for a per-sample ``forward`` (an MLP) whose hidden map is ``expansion`` times the size
    of ``x``, run on batch slices when no gradient flows and that map would exceed :data:`SLICE_BYTES`.

    glibc maps every block above its mmap threshold (at most 32 MB) afresh on each allocation, so the largest
    hidden maps (26-38 MB at batch 8 in the first stages) page-fault on every call; slices small enough for the
    allocator to reuse its memory make the same arithmetic about 10% faster end to end on CPU.
    """
    hidden_bytes = x.numel() * x.element_size() * expansion
    if hidden_bytes <= SLICE_BYTES or x.shape[0] == 1 or not (grad_free(x) and caching_allowed()):
        return forward(x, *args)
    slices = x.tensor_split(min(x.shape[0], math.ceil(hidden_bytes / SLICE_BYTES)))
    return torch.cat([forward(part, *args) for part in slices])
