"""LayerNorm over the last dimension: the extension's CPU inference kernel against F.layer_norm in float64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d as TimmLayerNorm2d

from dat_smt.ops.norm import LayerNorm, LayerNorm2d, layer_norm


def _expected(x, weight, bias, eps):
    as_double = [None if t is None else t.double() for t in (weight, bias)]
    return F.layer_norm(x.double(), x.shape[-1:], *as_double, eps)


@pytest.mark.parametrize(
    "shape",
    # whole vectors (the channel counts of DAT and SMT), vectors and a tail, tails alone, one channel
    [(3, 5, 32), (2, 64), (7, 256), (2, 3, 512), (4, 40), (5, 7), (3, 1)],
)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_cpu_kernel_matches_layer_norm(extension_calls, shape, affine):
    x = torch.randn(shape) * 3 + 5
    weight = torch.randn(shape[-1]) if affine != "none" else None
    bias = torch.randn(shape[-1]) if affine == "both" else None
    with torch.inference_mode():
        out = layer_norm(x, weight, bias, 1e-6)
    assert [name for name, _ in extension_calls] == ["layer_norm_forward"]
    torch.testing.assert_close(out.double(), _expected(x, weight, bias, 1e-6), atol=1e-5, rtol=1e-5)


def test_cpu_kernel_keeps_the_variance_of_offset_rows(extension_calls):
    """Rows far from zero with a small spread: the mean is taken out before squaring, so the variance does not cancel.
    The float32 mean of values near 1000 is off by about 1e-4, 1e-2 of this spread, as in PyTorch's kernel (7e-3);
    one pass of sums and sums of squares gets the variance wrong altogether (errors of 8)."""
    x = 1000.0 + torch.randn(16, 64) * 1e-2
    with torch.inference_mode():
        out = layer_norm(x, None, None, 1e-5)
    assert len(extension_calls) == 1
    torch.testing.assert_close(out.double(), _expected(x, None, None, 1e-5), atol=2e-2, rtol=0)


def test_layer_norm_2d_reads_channels_last_maps_and_keeps_their_layout(extension_calls):
    norm = LayerNorm2d(48, eps=1e-5)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    reference = TimmLayerNorm2d(48, eps=1e-5).double()
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 48, 5, 7)
    with torch.inference_mode():
        out = norm(x.contiguous(memory_format=torch.channels_last))
        assert len(extension_calls) == 1
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.double(), reference(x.double()), atol=1e-5, rtol=1e-5)
        nchw = norm(x)  # its channels are strided: PyTorch's kernel
        assert len(extension_calls) == 1
        torch.testing.assert_close(nchw.double(), reference(x.double()), atol=1e-5, rtol=1e-5)


def test_autograd_runs_pytorch_layer_norm(extension_calls):
    norm = LayerNorm(32, eps=1e-6)
    x = torch.randn(4, 32, requires_grad=True)
    out = norm(x)
    out.square().sum().backward()
    assert extension_calls == []
    torch.testing.assert_close(out, F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-6))
    assert x.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None


def test_modules_keep_the_state_dicts_of_their_bases():
    assert LayerNorm(16).state_dict().keys() == nn.LayerNorm(16).state_dict().keys()
    assert LayerNorm(16, bias=False).state_dict().keys() == {"weight"}
    assert LayerNorm2d(16).state_dict().keys() == TimmLayerNorm2d(16).state_dict().keys()


def test_layer_norm_over_several_dimensions_runs_pytorch(extension_calls):
    norm = LayerNorm((4, 6))
    x = torch.randn(3, 4, 6)
    with torch.inference_mode():
        out = norm(x)
    assert extension_calls == []
    torch.testing.assert_close(out, F.layer_norm(x, (4, 6), norm.weight, norm.bias))


def test_bad_parameters_raise_clear_errors(extension_calls):
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"weight and bias must be \(8\)"):
        layer_norm(torch.randn(2, 8), torch.ones(7), None, 1e-5)


@pytest.mark.parametrize(
    ("norm", "x"),
    [(LayerNorm(8, elementwise_affine=False), torch.randn(2, 6)),
     (LayerNorm2d(8, affine=False), torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last))],
)
def test_inputs_of_the_wrong_width_are_rejected_without_affine_parameters(extension_calls, norm, x):
    """With no weight to check against the input, the modules still refuse inputs whose channels are not the
    normalised shape (PyTorch's own error), rather than normalising whatever width they get."""
    with torch.inference_mode(), pytest.raises(RuntimeError, match="normalized_shape"):
        norm(x)
    assert extension_calls == []
