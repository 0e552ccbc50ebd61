"""Shared layers: the oneDNN-backed linear against ``F.linear``, GELU on channels-last maps against ``F.gelu``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dat_smt import _layers
from dat_smt._layers import GELU, Linear, gelu, gelu_, linear

needs_onednn = pytest.mark.skipif(_layers._onednn_linear is None, reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Records every call that reaches the oneDNN kernel."""
    calls = []
    kernel = _layers._onednn_linear

    def spy(*args):
        calls.append(args[3])
        return kernel(*args)

    monkeypatch.setattr(_layers, "_onednn_linear", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("layout", ["rows", "nhwc", "permuted", "transposed"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_inference_path_matches_f_linear(onednn_calls, layout, with_bias):
    weight, bias = torch.randn(40, 24), torch.randn(40) if with_bias else None
    x = {
        "rows": torch.randn(37, 24),
        "nhwc": torch.randn(2, 5, 7, 24),
        "permuted": torch.randn(2, 24, 5, 7).permute(0, 2, 3, 1),
        "transposed": torch.randn(24, 37).t(),
    }[layout]
    original = x.clone()
    with torch.inference_mode():
        out = linear(x, weight, bias)
    assert onednn_calls == ["none"]
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(x, original)


def test_autograd_float64_and_tracing_keep_f_linear(onednn_calls):
    weight = torch.randn(8, 6, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    x = torch.randn(5, 6, requires_grad=True)
    out = linear(x, weight, bias)
    assert torch.equal(out, F.linear(x, weight, bias))
    out.square().sum().backward()
    expected = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    F.linear(x, weight, bias).square().sum().backward()
    for got, t in zip(expected, (x, weight, bias)):
        assert torch.equal(got, t.grad)
    with torch.no_grad():
        double = torch.randn(5, 6, dtype=torch.float64)
        assert torch.equal(linear(double, weight.double()), F.linear(double, weight.double()))
        traced = torch.jit.trace(Linear(6, 8).eval(), torch.randn(3, 6), check_trace=False)
    assert "mkldnn" not in str(traced.inlined_graph)
    assert onednn_calls == []


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    plain = nn.Linear(6, 8)
    module = Linear(6, 8)
    module.load_state_dict(plain.state_dict())
    assert isinstance(module, nn.Linear) and list(module.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(module(x), plain(x), atol=1e-6, rtol=1e-6)


def _channels_last_map() -> torch.Tensor:
    return torch.linspace(-6, 6, 2 * 24 * 5 * 7).reshape(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "rows"])
def test_gelu_matches_f_gelu_and_keeps_the_layout(layout):
    x = _channels_last_map()
    x = {"channels_last": x, "nchw": x.contiguous(), "rows": x.reshape(-1, 7)}[layout]
    # the contiguous NCHW copy runs PyTorch's vectorised loop, which gelu must reproduce bit for bit
    expected = F.gelu(x.contiguous())
    out = gelu(x)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with torch.inference_mode():
        owned = x.clone()
        assert gelu_(owned) is owned
    torch.testing.assert_close(owned, expected, atol=0, rtol=0)


def test_gelu_keeps_gradients_and_leaves_autograd_inputs_alone():
    x = _channels_last_map().requires_grad_()
    reference = x.detach().contiguous().requires_grad_()
    F.gelu(reference).pow(2).sum().backward()
    source = x.detach().clone()
    gelu_(x).pow(2).sum().backward()
    torch.testing.assert_close(x, source, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-6, rtol=1e-5)


def test_gelu_module_is_in_place_only_when_asked():
    x = _channels_last_map()
    with torch.inference_mode():
        assert GELU()(x) is not x
        assert GELU(inplace=True)(x) is x
    assert isinstance(GELU(), nn.GELU) and GELU(inplace=True).extra_repr() == "inplace=True"
    torch.testing.assert_close(x, F.gelu(_channels_last_map().contiguous()), atol=0, rtol=0)
