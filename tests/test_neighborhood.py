"""Neighborhood attention (the blocked formulation and the CPU inference kernel) against the gather-based reference
(natten 0.14 semantics), forward and backward."""
import pytest
import torch

from dat_smt.ops.neighborhood import neighborhood_attention_2d, neighborhood_attention_2d_reference


@pytest.mark.parametrize(
    ("height", "width", "kernel_size", "block_size"),
    [(7, 7, 7, 8), (8, 8, 7, 8), (16, 12, 7, 8), (14, 14, 3, 4), (9, 11, 5, 8), (13, 29, 5, 6), (23, 17, 7, 5),
     (14, 14, 7, 7), (28, 28, 7, 7)],
)
def test_blocked_matches_reference(height, width, kernel_size, block_size):
    q, k, v = (torch.randn(2, 3, height, width, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(3, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=torch.float64, requires_grad=True)
    fast = neighborhood_attention_2d(q, k, v, rpb, kernel_size, block_size=block_size)
    reference = neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size)
    torch.testing.assert_close(fast, reference)
    grad = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v, rpb), grad),
                    torch.autograd.grad(reference, (q, k, v, rpb), grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("height", "width"), [(14, 14), (28, 21)])  # the dense and the blocked formulation
def test_scale_argument_equals_scaled_queries(height, width):
    q, k, v = (torch.randn(2, 4, height, width, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(4, 13, 13, dtype=torch.float64, requires_grad=True)
    scaled = neighborhood_attention_2d(q, k, v, rpb, 7, scale=0.35)
    reference = neighborhood_attention_2d_reference(q * 0.35, k, v, rpb, 7)
    torch.testing.assert_close(scaled, reference)
    grad = torch.randn_like(scaled)
    for a, b in zip(torch.autograd.grad(scaled, (q, k, v, rpb), grad),
                    torch.autograd.grad(reference, (q, k, v, rpb), grad)):
        torch.testing.assert_close(a, b)


def test_reference_border_windows_shift_inward():
    """Brute force on one query: a corner query attends to the k x k block at the corner, bias indexed by offset."""
    kernel_size, size = 3, 6
    q, k, v = (torch.randn(1, 1, size, size, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64)
    out = neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size)
    i, j = size - 1, 0
    keys = [(y, x) for y in range(size - 3, size) for x in range(0, 3)]
    logits = torch.stack([q[0, 0, i, j] @ k[0, 0, y, x] + rpb[0, y - i + 2, x - j + 2] for y, x in keys])
    expected = sum(w * v[0, 0, y, x] for w, (y, x) in zip(logits.softmax(0), keys))
    torch.testing.assert_close(out[0, 0, i, j], expected)


def test_too_small_map_is_rejected():
    q = torch.randn(1, 1, 5, 9, 4)
    with pytest.raises(ValueError, match="at least kernel_size"):
        neighborhood_attention_2d(q, q, q, torch.zeros(1, 13, 13), 7)


@pytest.mark.parametrize(
    ("height", "width", "kernel_size", "head_dim"),
    [(7, 7, 7, 32), (9, 13, 7, 32), (14, 14, 7, 32), (11, 6, 5, 64), (5, 8, 3, 12), (23, 17, 7, 40)],
)
def test_cpu_kernel_matches_reference(extension_calls, height, width, kernel_size, head_dim):
    """Inference on float32 CPU tensors runs the C++ kernel, here on q, k, v that are strided views of one qkv
    projection output as in the model."""
    qkv = torch.randn(2, height, width, 3, 3, head_dim).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv.unbind(0)
    rpb = torch.randn(3, 2 * kernel_size - 1, 2 * kernel_size - 1)
    with torch.inference_mode():
        out = neighborhood_attention_2d(q, k, v, rpb, kernel_size, scale=head_dim ** -0.5)
    assert [(name, args[-2]) for name, args in extension_calls] == [("neighborhood_attention_forward", kernel_size)]
    expected = neighborhood_attention_2d_reference(
        *(t.double() for t in (q * head_dim ** -0.5, k, v, rpb)), kernel_size)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()


def test_cpu_kernel_is_not_used_with_autograd(extension_calls):
    q, k, v = (torch.randn(1, 2, 9, 9, 8, requires_grad=True) for _ in range(3))
    out = neighborhood_attention_2d(q, k, v, torch.zeros(2, 13, 13), 7)
    out.sum().backward()
    assert extension_calls == [] and q.grad is not None
