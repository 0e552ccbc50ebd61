"""2-d neighborhood attention with relative position bias (Hassani et al., "Neighborhood Attention Transformer").

Each query attends to the ``k x k`` keys around it; at the borders the window is shifted inward so that it stays
``k`` wide (it is never zero-padded). The bias of a key is ``rpb[head, dy + k - 1, dx + k - 1]`` where ``(dy, dx)``
is the key position minus the query position. The semantics are those of natten 0.14 (used by DAT++).
"""
from typing import Tuple

import torch

__all__ = ["neighborhood_attention_2d", "neighborhood_attention_2d_reference"]


def _window_starts(length: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    return (positions - kernel_size // 2).clamp(0, length - kernel_size)


def _neighborhood_indices(
        height: int, width: int, kernel_size: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat key index (H*W, k*k) of every query's neighborhood and the flat index into the (2k-1)^2 bias table."""
    offsets = torch.arange(kernel_size, device=device)
    rows = _window_starts(height, kernel_size, device)[:, None] + offsets  # (H, k)
    cols = _window_starts(width, kernel_size, device)[:, None] + offsets  # (W, k)
    key_index = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)
    rel_rows = rows - torch.arange(height, device=device)[:, None] + kernel_size - 1
    rel_cols = cols - torch.arange(width, device=device)[:, None] + kernel_size - 1
    bias_index = rel_rows[:, None, :, None] * (2 * kernel_size - 1) + rel_cols[None, :, None, :]
    bias_index = bias_index.reshape(height * width, -1)
    return key_index, bias_index


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must be (B, heads, H, W, head_dim), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    height, width = q.shape[2:4]
    if height < kernel_size or width < kernel_size:
        raise ValueError(
            f"the map ({height}x{width}) must be at least kernel_size ({kernel_size}) on both sides; pad it first"
        )
    expected = (q.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1)
    if tuple(rpb.shape) != expected:
        raise ValueError(f"rpb must have shape {expected} (heads, 2k-1, 2k-1), got {tuple(rpb.shape)}")


def neighborhood_attention_2d_reference(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """Gather-based neighborhood attention, the test oracle.

    Args:
        q: (B, heads, H, W, head_dim) queries, already multiplied by the attention scale.
        k: (B, heads, H, W, head_dim) keys.
        v: (B, heads, H, W, head_dim) values.
        rpb: (heads, 2k-1, 2k-1) relative position bias.
        kernel_size: Odd neighborhood size k, at most H and W.

    Returns:
        (B, heads, H, W, head_dim)
    """
    _check_inputs(q, k, v, rpb, kernel_size)
    batch, heads, height, width, head_dim = q.shape
    key_index, bias_index = _neighborhood_indices(height, width, kernel_size, q.device)
    keys = k.reshape(batch, heads, height * width, head_dim)[:, :, key_index]
    values = v.reshape(batch, heads, height * width, head_dim)[:, :, key_index]
    attn = torch.einsum("bhnc,bhnkc->bhnk", q.reshape(batch, heads, height * width, head_dim), keys)
    attn = attn + rpb.flatten(1)[:, bias_index]
    out = torch.einsum("bhnk,bhnkc->bhnc", attn.softmax(-1), values)
    return out.reshape(batch, heads, height, width, head_dim)


def neighborhood_attention_2d(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """Neighborhood attention; same arguments and result as :func:`neighborhood_attention_2d_reference`."""
    return neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size)
