"""Depthwise conv with fused GELU: the extension's CPU inference kernel against F.conv2d and F.gelu in float64."""
import pytest
import torch
import torch.nn.functional as F

from dat_smt.ops import depthwise_conv2d
from dat_smt.ops.depthwise import ResidualDepthwiseConv2d


def _expected(x, weight, bias, gelu):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                   padding=weight.shape[-1] // 2, groups=weight.shape[0])
    return F.gelu(out) if gelu else out


@pytest.mark.parametrize(
    ("channels", "height", "width", "kernel_size"),
    # whole channel groups, single vectors and single channels; maps narrower and shorter than the kernel; both loop
    # orders of the 3x3 kernel (pixels outer, and channels outer from 1024 channels on)
    [(64, 9, 11, 3), (96, 7, 7, 3), (24, 5, 6, 3), (37, 6, 4, 3), (13, 1, 1, 3), (40, 2, 9, 3), (20, 8, 3, 5),
     (35, 4, 10, 7), (16, 3, 5, 1), (1024, 5, 6, 3), (1065, 4, 3, 3), (1029, 1, 1, 3), (1032, 3, 2, 3)],
)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_kernel_matches_conv_and_gelu(extension_calls, channels, height, width, kernel_size, gelu, with_bias):
    x = torch.randn(2, channels, height, width).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel_size, kernel_size)
    bias = torch.randn(channels) if with_bias else None
    with torch.inference_mode():
        out = depthwise_conv2d(x, weight, bias, gelu)
    assert [name for name, _ in extension_calls] == ["depthwise_conv2d_forward"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), _expected(x, weight, bias, gelu), atol=1e-5, rtol=1e-5)


def test_cpu_kernel_gelu_matches_exact_gelu_over_its_range(extension_calls):
    """A 1x1 identity conv isolates the activation: the vectorised erf GELU against the exact GELU in float64, from
    the saturated negative tail (exp underflow) through zero to large positive inputs, and NaN stays NaN. (Not
    against PyTorch's float32 GELU, whose error depends on the ISA it dispatches to: up to 1e-6 with AVX-512.)"""
    values = torch.cat([torch.linspace(-12, 12, 8191), torch.tensor([-100.0, -1e30, 100.0, 1e30, 0.0, -0.0])])
    x = values.reshape(1, -1, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = depthwise_conv2d(x, torch.ones(x.shape[1], 1, 1, 1), None, gelu=True).flatten()
        nan = depthwise_conv2d(torch.full((1, 8, 1, 1), float("nan")), torch.ones(8, 1, 1, 1), gelu=True)
    assert len(extension_calls) == 2
    torch.testing.assert_close(out.double(), F.gelu(values.double()), atol=5e-7, rtol=4e-6, check_dtype=False)
    assert nan.isnan().all()


def test_cpu_kernel_is_not_used_with_autograd_other_layouts_or_dtypes(extension_calls):
    weight = torch.randn(8, 1, 3, 3, requires_grad=True)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    depthwise_conv2d(x, weight, gelu=True).sum().backward()
    with torch.inference_mode():
        contiguous = depthwise_conv2d(x.contiguous(), weight, gelu=True)
        double = depthwise_conv2d(x.double(), weight.double(), gelu=True)
    assert extension_calls == [] and weight.grad is not None
    torch.testing.assert_close(contiguous.double(), double, atol=1e-5, rtol=1e-5)


def test_residual_layer_is_gelu_of_input_plus_conv_and_trains():
    layer = ResidualDepthwiseConv2d(6, gelu=True).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    expected = F.gelu(x + F.conv2d(x, layer.weight, layer.bias, padding=1, groups=6))
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert "gelu=True" in repr(layer)


def test_residual_layer_inference_kernel_equals_autograd_path(extension_calls):
    layer = ResidualDepthwiseConv2d(40, gelu=True)
    x = torch.randn(2, 40, 9, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = layer(x)
    assert len(extension_calls) == 1
    torch.testing.assert_close(fast, layer(x), atol=1e-5, rtol=1e-5)


def test_bad_weights_raise_clear_errors():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight must be \(C, 1, k, k\) with C = 4"):
        depthwise_conv2d(x, torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match="C = 4"):
        depthwise_conv2d(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ResidualDepthwiseConv2d(4, kernel_size=4)
