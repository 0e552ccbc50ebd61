"""Shared layers: the oneDNN-backed linear against ``F.linear``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dat_smt import _layers
from dat_smt._layers import Linear, linear

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
