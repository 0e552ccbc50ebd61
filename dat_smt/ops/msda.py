"""Multi-scale deformable attention sampling (MSDA), the operator of Deformable DETR.

Semantics (see Zhu et al., "Deformable DETR", ICLR 2021): for every query and head, a weighted sum of bilinear
samples taken at ``L * P`` fractional locations in ``L`` value maps, with the pixel-centre convention
(``x = u * W - 0.5``) and zero padding outside each map.

Backends: ``reference`` (pure PyTorch, below), ``cpp`` and ``cuda`` (the JIT-compiled extension of
``dat_smt/ops/csrc``, see :mod:`dat_smt.ops._extension`), exposed to PyTorch as the custom operator
``torch.ops.dat_smt.ms_deform_attn`` with a fake implementation and a registered backward, so it works under
``torch.compile(fullgraph=True)`` and ``torch.export``.
"""
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ._extension import extension_status, load_extension

__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference"]

BACKENDS = ("auto", "cpp", "cuda", "reference")


def ms_deform_attn_reference(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure PyTorch MSDA built on ``F.grid_sample``; differentiable by autograd, the oracle of the tests.

    Args:
        value: (N, S, M, D) values of all levels, levels concatenated, each level row-major.
        spatial_shapes: (L, 2) int64 rows (H, W).
        level_start_index: (L,) int64 offsets of each level in S (unused: the levels are split by size).
        sampling_locations: (N, Lq, M, L, P, 2) locations as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P) weights of the samples.

    Returns:
        (N, Lq, M * D) the weighted samples, heads concatenated.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(n, m * d, lq).transpose(1, 2).contiguous()


def _require_kernels(device_type: str) -> None:
    status = load_extension()
    if not status.get(device_type, False):
        raise RuntimeError(f"the MSDA extension has no {device_type} kernels: {status['reason']}")


@torch.library.custom_op("dat_smt::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    _require_kernels(value.device.type)
    return torch.ops.dat_smt_ext.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("dat_smt::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_kernels(value.device.type)
    return torch.ops.dat_smt_ext.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: torch.Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _ms_deform_attn_backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
    )
    return grad_value, None, None, grad_locations, grad_weights


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)

_warned_fallback = False


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"dat_smt: the multi-scale deformable attention extension is unavailable ({reason}); "
            "using the much slower pure PyTorch 'reference' backend",
            RuntimeWarning,
            stacklevel=4,
        )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "reference":
        return backend
    if backend in ("cpp", "cuda"):
        expected = "cpu" if backend == "cpp" else "cuda"
        if device.type != expected:
            raise ValueError(f"backend={backend!r} needs {expected} tensors, got tensors on {device}")
        if not extension_status(expected):
            raise RuntimeError(
                f"backend={backend!r} was requested but the MSDA extension has no {expected} kernels: "
                f"{load_extension()['reason']}"
            )
        return backend
    if device.type in ("cpu", "cuda") and extension_status(device.type):
        return "cpp" if device.type == "cpu" else "cuda"
    _warn_fallback(load_extension()["reason"] if device.type in ("cpu", "cuda") else f"no kernels for {device}")
    return "reference"


def _check_inputs(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> None:
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if not named[name].is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {named[name].dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise TypeError(f"{name} must have the dtype of value ({value.dtype}), got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].is_floating_point() or named[name].is_complex() or named[name].dtype == torch.bool:
            raise TypeError(f"{name} must be an integer (int64) tensor, got dtype {named[name].dtype}")
    for name, tensor in named.items():
        if tensor.device != value.device:
            raise ValueError(
                f"{name} is on {tensor.device} but value is on {value.device}; put all inputs on one device"
            )
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) rows (H, W), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(f"level_start_index must be ({num_levels},) (L,), got shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    _, lq, _, _, p, _ = sampling_locations.shape
    expected = (n, lq, m, num_levels, p, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2) = {expected} given value {tuple(value.shape)} and "
            f"spatial_shapes {tuple(spatial_shapes.shape)}, got {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_weights.shape) != expected[:-1]:
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P) = {expected[:-1]}, got {tuple(attention_weights.shape)}"
        )
    # The sizes live in tensor data: reading them on a GPU would synchronise, and under torch.compile/export they
    # are symbolic, so only eager CPU calls check them here (the CPU kernel checks them again).
    if spatial_shapes.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return
    sizes = spatial_shapes.prod(1)
    if (spatial_shapes <= 0).any():
        raise ValueError(f"spatial_shapes must be positive, got {spatial_shapes.tolist()}")
    if int(sizes.sum()) != s:
        raise ValueError(
            f"value has S = {s} positions but spatial_shapes {spatial_shapes.tolist()} sum to {int(sizes.sum())}"
        )
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if not torch.equal(level_start_index.to(starts.dtype), starts):
        raise ValueError(
            f"level_start_index must be the exclusive cumsum of H*W, {starts.tolist()}, "
            f"got {level_start_index.tolist()}"
        )


def multi_scale_deformable_attention(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        *,
        backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention sampling; see :func:`ms_deform_attn_reference` for the layouts.

    Args:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as in
            :func:`ms_deform_attn_reference`; non-contiguous tensors are accepted.
        backend: ``"cpp"`` (CPU kernel), ``"cuda"`` (GPU kernel), ``"reference"`` (pure PyTorch) or ``"auto"``:
            the extension's kernel for the tensors' device when it is available, else ``reference`` with one
            warning saying why. Requesting ``cpp``/``cuda`` when unavailable raises ``RuntimeError``.

    Returns:
        (N, Lq, M * D) in the dtype of ``value``. The extension computes float16/bfloat16 in float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    resolved = _resolve_backend(backend, value.device)
    if resolved == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _ms_deform_attn_op(
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
