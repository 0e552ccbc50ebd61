"""SMT: parity with the official code (reference fixtures), official checkpoint formats, timm behaviour."""
import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import dat_smt  # noqa: F401  (registers the models)
from dat_smt import _layers
from dat_smt.smt import SMT, ConvMlp, checkpoint_filter_fn

MANIFESTS = {
    "smt_tiny": ("smt_tiny", {}),
    "smt_small": ("smt_small", {}),
    "smt_base": ("smt_base", {}),
    "smt_large_224_22k": ("smt_large", {"num_classes": 21841}),
    "smt_large_224_22kto1k": ("smt_large", {}),
    "smt_large_384_22kto1k": ("smt_large_384", {}),
}


def _fixture(reference_dir, name):
    meta = json.loads((reference_dir / "fixtures" / f"{name}.json").read_text())
    tensors = load_file(str(reference_dir / "fixtures" / f"{name}.safetensors"))
    official = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    kwargs = meta["constructor_kwargs"]
    model = SMT(
        in_chans=kwargs["in_chans"], num_classes=kwargs["num_classes"], embed_dims=kwargs["embed_dims"],
        ca_num_heads=kwargs["ca_num_heads"], sa_num_heads=kwargs["sa_num_heads"], mlp_ratios=kwargs["mlp_ratios"],
        qkv_bias=kwargs["qkv_bias"], use_layerscale=kwargs["use_layerscale"],
        layerscale_value=kwargs["layerscale_value"], depths=kwargs["depths"], ca_attentions=kwargs["ca_attentions"],
        head_conv=kwargs["head_conv"], expand_ratio=kwargs["expand_ratio"],
    ).eval()
    return meta, tensors, official, model


@pytest.mark.parametrize("name", ["smt_small", "smt_ls_small"])
@pytest.mark.parametrize("fused", [True, False])
def test_fixture_parity(reference_dir, name, fused):
    meta, tensors, official, model = _fixture(reference_dir, name)
    assert sum(p.numel() for p in model.parameters()) == meta["total_params"]
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    with torch.no_grad():
        logits = model(tensors["input"])
        final, stages = model.forward_intermediates(tensors["input"])
        normed = model.forward_intermediates(tensors["input"], norm=True, intermediates_only=True)
    torch.testing.assert_close(logits, tensors["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(final, normed[3])
    for i in range(4):
        # norm=False: the raw block outputs; norm=True: after the stage's own norm{i}
        torch.testing.assert_close(stages[i], tensors[f"stage{i}"], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(normed[i], tensors[f"stage{i}_normed"], atol=2e-4, rtol=1e-4)


def test_fixture_interleaving_matters(reference_dir):
    """The fixture must reject head-major MHMC concatenation, so the interleaved order is really tested."""
    _, tensors, official, model = _fixture(reference_dir, "smt_small")
    model.load_state_dict(checkpoint_filter_fn(official, model))
    attn = model.block1[0].attn
    original = attn.forward

    def head_major(x, height, width):
        batch, _, dim = x.shape
        v = attn.v(x)
        s = attn.s(x).transpose(1, 2).reshape(batch, dim, height, width).chunk(attn.num_heads, dim=1)
        mixed = torch.cat([getattr(attn, f"local_conv_{i + 1}")(t) for i, t in enumerate(s)], dim=1)
        modulator = attn.proj1(torch.nn.functional.gelu(attn.bn(attn.proj0(mixed))))
        return attn.proj(modulator.flatten(2).transpose(1, 2) * v)

    attn.forward = head_major
    with torch.no_grad():
        wrong = model(tensors["input"])
    attn.forward = original
    assert (wrong - tensors["logits"]).abs().max() > 1e-3


def test_detection_naming_and_prefix(reference_dir):
    _, tensors, official, model = _fixture(reference_dir, "smt_small")
    renamed = {}
    for key, value in official.items():
        if key.startswith("head."):
            continue
        msa = key.startswith(("block3.1.", "block4.")) and ".attn.local_conv." in key
        renamed["backbone." + (key.replace(".attn.local_conv.", ".attn.dw_conv.") if msa else key)] = value
    backbone = SMT(**{k: v for k, v in _backbone_kwargs(reference_dir).items()}, num_classes=0).eval()
    backbone.load_state_dict(checkpoint_filter_fn({"state_dict": renamed}, backbone), strict=True)
    with torch.no_grad():
        stages = backbone.forward_intermediates(tensors["input"], norm=True, intermediates_only=True)
    torch.testing.assert_close(stages[3], tensors["stage3_normed"], atol=2e-4, rtol=1e-4)


def _backbone_kwargs(reference_dir):
    kwargs = json.loads((reference_dir / "fixtures" / "smt_small.json").read_text())["constructor_kwargs"]
    keep = ("embed_dims", "ca_num_heads", "sa_num_heads", "mlp_ratios", "depths", "ca_attentions", "head_conv")
    return {k: kwargs[k] for k in keep}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_strict_load_and_param_count(reference_dir, manifest):
    name, kwargs = MANIFESTS[manifest]
    spec = json.loads((reference_dir / "manifests" / f"{manifest}.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == spec["total_params"]
    state_dict = {key: torch.empty(shape, device="meta") for key, shape, _ in spec["state_dict"]}
    converted = checkpoint_filter_fn({"model": state_dict, "optimizer": {}, "epoch": 3}, model)
    assert set(converted) == set(model.state_dict())


def test_bad_checkpoints():
    model = timm.create_model("smt_tiny", num_classes=10, depths=(1, 1, 2, 1))
    good = model.state_dict()
    missing = dict(good)
    missing.pop("block3.1.attn.q.weight")
    with pytest.raises(ValueError, match=r"missing \(1\): block3.1.attn.q.weight"):
        checkpoint_filter_fn(missing, model)
    with pytest.raises(ValueError, match=r"unexpected \(1\): block9.0.extra"):
        checkpoint_filter_fn({**good, "block9.0.extra": torch.zeros(1)}, model)
    bad_shape = {**good, "norm4.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): norm4.weight"):
        checkpoint_filter_fn(bad_shape, model)


def test_head_mapping_is_explicit():
    small = dict(depths=(1, 1, 2, 1))
    source = timm.create_model("smt_tiny", num_classes=30, **small)
    target = timm.create_model("smt_tiny", num_classes=10, **small)
    state_dict = source.state_dict()
    with pytest.raises(ValueError, match="head_mapping"):
        checkpoint_filter_fn(state_dict, target)
    mapping = list(range(29, 9, -2))
    mapped = checkpoint_filter_fn(state_dict, target, head_mapping=mapping)
    torch.testing.assert_close(mapped["head.weight"], state_dict["head.weight"][mapping])
    dropped = checkpoint_filter_fn(state_dict, target, head_mapping="drop")
    assert torch.equal(dropped["head.weight"], target.head.weight)
    with pytest.raises(ValueError, match="30"):
        checkpoint_filter_fn(state_dict, target, head_mapping=[30] * 10)
    headless = timm.create_model("smt_tiny", num_classes=0, **small)
    headless.load_state_dict(checkpoint_filter_fn(state_dict, headless))


def test_pretrained_file_overlay(tmp_path):
    small = dict(depths=(1, 1, 2, 1))
    source = timm.create_model("smt_tiny", **small).eval()
    path = tmp_path / "smt_tiny.pth"
    torch.save({"model": source.state_dict(), "epoch": 1, "max_accuracy": 80.0}, path)
    loaded = timm.create_model("smt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source(x))
    # an explicit different num_classes drops the pretrained head the timm way
    other = timm.create_model("smt_tiny", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)), **small)
    assert other.head.weight.shape == (7, 512)
    torch.testing.assert_close(other.norm4.weight, source.norm4.weight)


@pytest.mark.parametrize("size", [(200, 333), (97, 131), (64, 48)])
def test_features_only_any_size(size):
    model = timm.create_model("smt_tiny", features_only=True, depths=(1, 1, 2, 1), out_indices=(1, 2, 3)).eval()
    assert model.feature_info.reduction() == [8, 16, 32]
    assert model.feature_info.channels() == [128, 256, 512]
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    # the stem's 2x2 stride-2 conv floors (as the official code does), every later downsampling rounds up
    expected = tuple(((s + 1) // 2) // 2 for s in size)
    for feature, channels in zip(features, (128, 256, 512)):
        expected = tuple((s + 1) // 2 for s in expected)
        assert feature.shape == (1, channels, *expected)


def test_features_only_returns_the_normed_stages():
    torch.manual_seed(0)
    features = timm.create_model("smt_tiny", features_only=True, depths=(1, 1, 2, 1)).eval()
    torch.manual_seed(0)  # same initial weights
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        maps = features(x)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        raw = model.forward_intermediates(x, intermediates_only=True)
    for feature_map, stage, block_output, norm in zip(maps, normed, raw, (model.norm1, model.norm2, model.norm3,
                                                                          model.norm4)):
        torch.testing.assert_close(feature_map, stage)
        torch.testing.assert_close(stage, norm(block_output.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_forward_intermediates_matches_forward_features():
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[1])
    model.prune_intermediate_layers([1])
    assert model.num_stages == 2 and not hasattr(model, "block3")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[-1], intermediates[1])


def test_bad_inputs():
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least"):
        model.forward_intermediates(torch.randn(1, 3, 2, 64))
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NHWC")


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_and_classifier(in_chans):
    model = timm.create_model("smt_tiny", in_chans=in_chans, num_classes=5, depths=(1, 1, 2, 1),
                              drop_path_rate=0.1)
    out = model(torch.randn(2, in_chans, 64, 64))
    assert out.shape == (2, 5)
    out.sum().backward()
    features = model.forward_features(torch.randn(1, in_chans, 64, 64))
    assert model.forward_head(features, pre_logits=True).shape == (1, 512)
    model.reset_classifier(0, "")
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 512, 2, 2)


def test_layerscale_and_stem_variants():
    model = timm.create_model("smt_large", depths=(1, 1, 2, 1))
    assert model.patch_embed1.conv[0].kernel_size == (7, 7)
    assert model.block3[1].gamma_1.shape == (384,)
    assert {n for n, _ in model.named_parameters() if "gamma" in n} == model.no_weight_decay()
    assert model.patch_embed2.norm.eps == 1e-5 and model.block1[0].norm1.eps == 1e-6 and model.norm1.eps == 1e-6
    kinds = [type(block.attn).__name__ for block in model.block3]
    assert kinds == ["ScaleAwareModulation", "SelfAttention"]


def test_default_cfgs():
    cfgs = {name: timm.models.get_pretrained_cfg(name).to_dict() for name in timm.list_pretrained("smt_*")}
    assert set(cfgs) == {
        "smt_tiny.in1k", "smt_small.in1k", "smt_base.in1k", "smt_large.in22k", "smt_large.in22k_ft_in1k",
        "smt_large_384.in22k_ft_in1k",
    }
    assert cfgs["smt_large.in22k"]["num_classes"] == 21841
    assert cfgs["smt_large_384.in22k_ft_in1k"]["input_size"] == (3, 384, 384)
    assert cfgs["smt_large_384.in22k_ft_in1k"]["crop_pct"] == 1.0
    for cfg in cfgs.values():
        assert cfg["url"].startswith("https://github.com/AFeng-x/SMT/releases/download/v1.0.0/smt_")
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1))
    params = dict(model.named_parameters())
    assert model.pretrained_cfg["first_conv"] + ".weight" in params
    assert model.pretrained_cfg["classifier"] + ".weight" in params


def test_trace_and_grad_checkpointing():
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x), model(x))
    model.train().set_grad_checkpointing()
    model(x).sum().backward()
    assert model.block3[1].attn.q.weight.grad is not None


@pytest.mark.slow
def test_export_matches_eager():
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(2, 3, 64, 96)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.slow
def test_compile_matches_eager():
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)


def _plain_forward(model: SMT, x: torch.Tensor) -> torch.Tensor:
    """The SMT classifier written plainly after the official formulation: per-head MHMC convs stacked into the
    interleaved order, BN modules, out-of-place residuals and activations. The truth for the fast paths."""
    gelu = torch.nn.functional.gelu

    def to_map(t, height, width):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)

    def sam(attn, t, height, width):
        batch, tokens, dim = t.shape
        s = attn.s(t).reshape(batch, height, width, attn.num_heads, dim // attn.num_heads).permute(3, 0, 4, 1, 2)
        heads = [getattr(attn, f"local_conv_{i + 1}")(s[i]) for i in range(attn.num_heads)]
        modulator = attn.proj1(gelu(attn.bn(attn.proj0(torch.stack(heads, 2).reshape(batch, dim, height, width)))))
        return attn.proj(modulator.reshape(batch, dim, tokens).transpose(1, 2) * attn.v(t))

    def msa(attn, t, height, width):
        batch, tokens, dim = t.shape
        q = attn.q(t).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
        k, v = attn.kv(t).reshape(batch, tokens, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = (((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        local = attn.local_conv(to_map(v.transpose(1, 2).reshape(batch, tokens, dim), height, width))
        return attn.proj(out + local.flatten(2).transpose(1, 2))

    def mlp(m, t, height, width):
        hidden = m.fc1(t)
        conv = m.dwconv.dwconv
        local = torch.nn.functional.conv2d(to_map(hidden, height, width), conv.weight, conv.bias, padding=1,
                                           groups=conv.groups)
        return m.fc2(gelu(hidden + local.flatten(2).transpose(1, 2)))

    for i in range(model.num_stages):
        embed = getattr(model, f"patch_embed{i + 1}")
        x = embed.conv(x) if i == 0 else embed.proj(x)
        height, width = x.shape[-2:]
        x = embed.norm(x.flatten(2).transpose(1, 2))
        for block in getattr(model, f"block{i + 1}"):
            mixer = sam if hasattr(block.attn, "proj0") else msa
            gamma_1, gamma_2 = (block.gamma_1, block.gamma_2) if block.use_layerscale else (1.0, 1.0)
            x = x + gamma_1 * mixer(block.attn, block.norm1(x), height, width)
            x = x + gamma_2 * mlp(block.mlp, block.norm2(x), height, width)
        x = to_map(getattr(model, f"norm{i + 1}")(x), height, width)
    return model.head(x.mean(dim=(-2, -1)))


@pytest.mark.parametrize("kwargs", [{}, {"use_layerscale": True, "layerscale_value": 0.5, "head_conv": 7}])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_paths_match_plain_math_and_gradients(kwargs, mode):
    """Folded BNs, in-place activations / products / residuals: outputs, every gradient and (in training) the BN
    running statistics equal the plain formulation, with and without autograd (in float64, so that only a real
    difference, not summation order, can fail)."""
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1), **kwargs).double()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    plain = copy.deepcopy(model)
    model.train(mode == "train")
    plain.train(mode == "train")
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = model(x_fast)
    expected = _plain_forward(plain, x_plain)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x_plain.grad, atol=1e-10, rtol=1e-9)
    plain_params = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_params[name].grad, atol=1e-10, rtol=1e-9, msg=name)
    plain_buffers = dict(plain.named_buffers())
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, plain_buffers[name], msg=name)
    if mode == "train":
        assert not torch.equal(model.patch_embed1.conv[1].running_mean, torch.zeros(64, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain_forward(plain, x), atol=1e-10, rtol=1e-9)


def test_inference_batch_slices_match_plain_math(monkeypatch):
    """Without autograd, MLPs with large hidden maps run in batch slices: the result must not change."""
    model = timm.create_model("smt_tiny", depths=(1, 1, 2, 1)).double().eval()
    x = torch.randn(3, 3, 64, 96, dtype=torch.float64)
    calls = []
    original = ConvMlp._forward
    monkeypatch.setattr(ConvMlp, "_forward", lambda self, *args: calls.append(1) or original(self, *args))
    monkeypatch.setattr(_layers, "SLICE_BYTES", 1)
    with torch.no_grad():
        out = model(x)
    assert len(calls) == 3 * 5
    torch.testing.assert_close(out, _plain_forward(model, x), atol=1e-10, rtol=1e-9)
