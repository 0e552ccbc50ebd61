"""timm's per-model contract, checked generically for every model dat-smt registers (after timm's test_models.py).

The ``*_tiny`` models run by default; the rest of the zoo, torch.compile and tracing run with ``--slow``.
"""
import pytest
import timm
import torch
import torch.nn as nn

import dat_smt

ALL_MODELS = dat_smt.list_models()
MODELS = [
    pytest.param(name, marks=() if name.endswith("_tiny") else pytest.mark.slow) for name in ALL_MODELS
]
NON_DEFAULT_SIZE = (160, 224)


def _create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def _default_size(model: nn.Module):
    return model.pretrained_cfg["input_size"]


def test_zoo_is_registered():
    assert ALL_MODELS, "dat_smt registered no models"
    for name in ALL_MODELS:
        assert timm.is_model(name)
        assert timm.models.get_pretrained_cfg(name) is not None


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier", "license"):
        assert key in cfg, f"{name}: pretrained cfg lacks {key}"
    assert len(cfg["input_size"]) == 3 and cfg["input_size"][0] == 3
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert 0 < cfg["crop_pct"] <= 1
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    classifier = model.get_submodule(cfg["classifier"])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == cfg["num_classes"] == model.num_classes
    assert classifier.in_features == model.num_features
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    matcher = model.group_matcher()
    assert "stem" in matcher and "blocks" in matcher


@pytest.mark.parametrize("name", MODELS)
def test_forward_default_size(name):
    model = _create(name).eval()
    with torch.no_grad():
        x = torch.randn(1, *_default_size(model))
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(model(x), logits)
    assert logits.shape == (1, model.num_classes) and torch.isfinite(logits).all()
    assert pooled.shape == (1, model.num_features)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_backward_non_default_size(name):
    model = _create(name, num_classes=5, drop_path_rate=0.1).train()
    model.set_grad_checkpointing(True)
    out = model(torch.randn(2, 3, *NON_DEFAULT_SIZE))
    assert out.shape == (2, 5)
    out.square().sum().backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, f"{name}: parameters without gradient: {without_grad}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans(name, in_chans):
    model = _create(name, in_chans=in_chans, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_chans, *NON_DEFAULT_SIZE)).shape == (1, 3)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_forward_intermediates(name):
    size = (96, 130)
    torch.manual_seed(0)
    features = _create(name, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert reductions == [4, 8, 16, 32]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        maps = features(x)
    assert [m.shape[1] for m in maps] == channels
    for feature_map, stride in zip(maps, reductions):
        # DAT pads to whole windows and crops (ceil); SMT's strided convs drop a trailing odd row (floor)
        for extent, length in zip(feature_map.shape[2:], size):
            assert extent in (length // stride, -(-length // stride)), f"{name}: {extent} rows at stride {stride}"

    torch.manual_seed(0)  # same initial weights as the features_only model
    model = _create(name).eval()
    norm = features.norm  # the family's features_only choice (SMT: after the stage norms)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, norm=norm)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[1, 3], norm=norm, intermediates_only=True)
    assert [m.shape[1] for m in intermediates] == channels
    for a, b in zip(intermediates, maps):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(only[0], intermediates[1])
    torch.testing.assert_close(only[1], intermediates[3])
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], norm=norm, intermediates_only=True)
    torch.testing.assert_close(pruned[1], intermediates[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_jit_trace_classifier(name):
    model = _create(name).eval()
    x = torch.randn(1, *_default_size(model))
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n.endswith("_tiny")])
def test_torch_compile_classifier(name):
    model = _create(name).eval()
    x = torch.randn(1, *_default_size(model))
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
