"""2-d neighborhood attention with relative position bias (Hassani et al., "Neighborhood Attention Transformer").

Each query attends to the ``k x k`` keys around it; at the borders the window is shifted inward so that it stays
``k`` wide (it is never zero-padded). The bias of a key is ``rpb[head, dy + k - 1, dx + k - 1]`` where ``(dy, dx)``
is the key position minus the query position. The semantics are those of natten 0.14 (used by DAT++).
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .._layers import SizeCache, eager_cpu_inference
from ._extension import extension_status

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


def _block_layout(length: int, kernel_size: int, block: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Per axis: query rows of each block, the key halo rows they need, the bias index and validity of each
    (query, halo key) pair, and for every row its block and offset inside the block."""
    block = min(block, length)
    halo = min(block + kernel_size - 1, length)
    num_blocks = -(-length // block)
    starts = (torch.arange(num_blocks, device=device) * block).clamp(max=length - block)
    query_rows = starts[:, None] + torch.arange(block, device=device)  # (nb, T)
    halo_starts = (starts - kernel_size // 2).clamp(0, length - halo)
    halo_rows = halo_starts[:, None] + torch.arange(halo, device=device)  # (nb, K)
    window_starts = _window_starts(length, kernel_size, device)[query_rows]  # (nb, T)
    offset = halo_rows[:, None, :] - window_starts[:, :, None]
    valid = (offset >= 0) & (offset < kernel_size)  # (nb, T, K)
    rel = (halo_rows[:, None, :] - query_rows[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    positions = torch.arange(length, device=device)
    row_block = (positions // block).clamp(max=num_blocks - 1)
    row_offset = positions - starts[row_block]
    return query_rows, halo_rows, rel, valid, row_block, row_offset


class _Layout(NamedTuple):
    """Index tensors of the blocked formulation for one map size (see :func:`neighborhood_attention_2d`)."""

    query_index: torch.Tensor  # (nb, T) flat query positions of every block
    key_index: torch.Tensor  # (nb, K) flat key positions of every block's halo
    bias_index: torch.Tensor  # (nb * T * K,) flat index into the masked bias table (see _masked_bias)
    out_index: torch.Tensor  # (H * W,) flat (block, place in block) position of each result


_LAYOUT_CACHE = SizeCache(32)


def _layout(height: int, width: int, kernel_size: int, block_size: int, device: torch.device) -> _Layout:
    """The layout for one size, cached (LRU) outside tracing and compilation: it depends on sizes only."""
    return _LAYOUT_CACHE.get(
        (height, width, kernel_size, block_size, str(device)),
        lambda: _build_layout(height, width, kernel_size, block_size, device),
    )


def _build_layout(height: int, width: int, kernel_size: int, block_size: int, device: torch.device) -> _Layout:
    rows_q, rows_k, rel_h, valid_h, block_h, offset_h = _block_layout(height, kernel_size, block_size, device)
    cols_q, cols_k, rel_w, valid_w, block_w, offset_w = _block_layout(width, kernel_size, block_size, device)
    nbw, tw, kw = rel_w.shape
    span = 2 * kernel_size - 1
    bias_index = rel_h[:, None, :, None, :, None] * span + rel_w[None, :, None, :, None, :]
    outside = ~(valid_h[:, None, :, None, :, None] & valid_w[None, :, None, :, None, :])
    out_block = block_h[:, None] * nbw + block_w[None, :]
    out_offset = offset_h[:, None] * tw + offset_w[None, :]
    return _Layout(
        query_index=(rows_q[:, None, :, None] * width + cols_q[None, :, None, :]).reshape(-1, rows_q.shape[1] * tw),
        key_index=(rows_k[:, None, :, None] * width + cols_k[None, :, None, :]).reshape(-1, rows_k.shape[1] * kw),
        bias_index=bias_index.masked_fill(outside, span * span).reshape(-1),
        out_index=(out_block * (rows_q.shape[1] * tw) + out_offset).reshape(-1),
    )


def _dense_layout(height: int, width: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """Flat index into the masked bias table (see :func:`_masked_bias`) of every (query, key) pair of the map,
    cached (LRU) like the blocked layout."""
    return _LAYOUT_CACHE.get(
        (height, width, kernel_size, 0, str(device)), lambda: _build_dense_layout(height, width, kernel_size, device)
    )


def _build_dense_layout(height: int, width: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    key_index, bias_index = _neighborhood_indices(height, width, kernel_size, device)
    tokens = height * width
    masked_entry = (2 * kernel_size - 1) ** 2
    dense = torch.full((tokens, tokens), masked_entry, dtype=torch.long, device=device)
    return dense.scatter_(1, key_index, bias_index).reshape(-1)


def _masked_bias(rpb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rpb`` read at ``index`` for every head, where index ``(2k-1)^2`` (one past the table) reads a large
    negative bias: one ``index_select`` (several times faster than advanced indexing followed by a masked fill)."""
    # a finite "minus infinity" keeps SDPA off its slow fully-masked-row handling; exp() of it is exactly 0
    masked = rpb.new_full((rpb.shape[0], 1), torch.finfo(rpb.dtype).min / 2)
    return torch.cat([rpb.flatten(1), masked], 1).index_select(1, index)


def _blocked_pairs(length: int, kernel_size: int, block_size: int) -> Tuple[int, int]:
    """(query, key) pairs along one axis of the blocked formulation: blocks x block length x halo length."""
    block = min(block_size, length)
    return -(-length // block) * block * min(block + kernel_size - 1, length), length * length


def neighborhood_attention_2d(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int, block_size: int = 7,
        scale: float = 1.0,
) -> torch.Tensor:
    """Neighborhood attention; same arguments and result as :func:`neighborhood_attention_2d_reference`, except
    that the logits are multiplied by ``scale`` (so ``q`` need not be scaled beforehand).

    The map is cut into ``block_size``-square query blocks; each block attends densely (one fused SDPA call for
    all blocks) to the key halo that contains every neighborhood of its queries, with the relative position bias
    and a large negative bias for halo keys outside a query's neighborhood. Small maps, where the halos cover
    most of the map anyway (DAT++'s 14x14 third stage), attend densely to the whole map with such a bias instead,
    which needs no gathering of q, k, v and the result.

    Inference (no gradient, eager) on float32 CPU tensors runs the C++ kernel of the project's extension instead,
    which reads every query's neighbours in place (3-4x faster on DAT++'s first stages); without the extension,
    with autograd and on other devices the formulation above runs.

    The result is a (B, heads, H, W, head_dim) view of a (B, H, W, heads, head_dim) tensor, so that merging the
    heads back into channels is free.
    """
    _check_inputs(q, k, v, rpb, kernel_size)
    if eager_cpu_inference(q, k, v, rpb) and extension_status("cpu"):
        out = torch.ops.dat_smt_ext.neighborhood_attention_forward(q, k, v, rpb, kernel_size, scale)
        return out.permute(0, 3, 1, 2, 4)
    batch, heads, height, width, head_dim = q.shape
    blocked_h, dense_h = _blocked_pairs(height, kernel_size, block_size)
    blocked_w, dense_w = _blocked_pairs(width, kernel_size, block_size)
    if dense_h * dense_w <= 2 * blocked_h * blocked_w:
        with torch.no_grad():
            bias_index = _dense_layout(height, width, kernel_size, q.device)
        tokens = height * width
        bias = _masked_bias(rpb, bias_index).reshape(1, heads, tokens, tokens)
        out = F.scaled_dot_product_attention(
            *(t.reshape(batch, heads, tokens, head_dim) for t in (q, k, v)), attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(batch, height, width, heads, head_dim).permute(0, 3, 1, 2, 4)

    with torch.no_grad():
        layout = _layout(height, width, kernel_size, block_size, q.device)
    num_blocks, block_len = layout.query_index.shape
    halo_len = layout.key_index.shape[1]

    def blocks(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # one gather straight into SDPA's (B, heads * blocks, tokens, head_dim) layout
        return x.reshape(batch, heads, height * width, head_dim)[:, :, index].reshape(
            batch, heads * num_blocks, index.shape[1], head_dim)

    bias = _masked_bias(rpb, layout.bias_index)
    out = F.scaled_dot_product_attention(
        blocks(q, layout.query_index), blocks(k, layout.key_index), blocks(v, layout.key_index),
        # 4-d: SDPA takes its fused CPU kernel only for 2-d or 4-d masks (a 3-d one falls back to the math path)
        attn_mask=bias.reshape(1, heads * num_blocks, block_len, halo_len), scale=scale,
    )
    out = out.reshape(batch, heads, num_blocks * block_len, head_dim).transpose(1, 2)
    out = out.index_select(1, layout.out_index)  # (B, H*W, heads, head_dim)
    return out.reshape(batch, height, width, heads, head_dim).permute(0, 3, 1, 2, 4)
