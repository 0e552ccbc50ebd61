"""DAT / DAT++: parity with the official reference fixtures, checkpoint conversion, any-size features, errors."""
import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dat_smt  # noqa: F401  (registers the models)
from dat_smt import _layers
from dat_smt.dat import DAT, WindowAttention, checkpoint_filter_fn

VARIANTS = {
    "dat_tiny": "dat_v1_tiny", "dat_small": "dat_v1_small", "dat_base": "dat_v1_base",
    "dat_base_384": "dat_v1_base_384", "dat_pp_tiny": "dat_pp_tiny", "dat_pp_small": "dat_pp_small",
    "dat_pp_base": "dat_pp_base", "dat_pp_base_384": "dat_pp_base_384",
}


def _fixture(reference_dir, name):
    meta = json.loads((reference_dir / "fixtures" / f"{name}.json").read_text())
    tensors = load_file(reference_dir / "fixtures" / f"{name}.safetensors")
    official = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return meta, tensors, official


@pytest.mark.parametrize("name", ["dat_v1_small", "dat_pp_small"])
def test_reference_fixture_parity(reference_dir, name):
    meta, tensors, official = _fixture(reference_dir, name)
    model = DAT(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": official, "optimizer": {}, "epoch": 3}, model))
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=1e-4, rtol=0)
        stages = model.forward_intermediates(tensors["input"], intermediates_only=True)
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, tensors[f"stage{i}"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", list(VARIANTS))
def test_manifest_state_dict_converts_strictly(reference_dir, model_name):
    manifest = json.loads((reference_dir / "manifests" / f"{VARIANTS[model_name]}.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]
    official = {key: torch.empty(shape, device="meta") for key, shape, _ in manifest["state_dict"]}
    converted = checkpoint_filter_fn({"model": official}, model)
    model.load_state_dict(converted, strict=True, assign=True)
    dense = {f"backbone.{k}": v for k, v in official.items() if not k.startswith(("cls_head", "cls_norm"))}
    dense.update({f"backbone.norms.{i}.norm.weight": torch.empty(1, device="meta") for i in range(4)})
    with torch.device("meta"):
        backbone = timm.create_model(model_name, num_classes=0)
    backbone.norm = torch.nn.Identity()
    backbone.load_state_dict(checkpoint_filter_fn({"state_dict": dense}, backbone), strict=True, assign=True)


def test_bad_checkpoint_lists_keys(reference_dir):
    meta, _, official = _fixture(reference_dir, "dat_v1_small")
    model = DAT(**meta["constructor_kwargs"])
    broken = dict(official)
    del broken["stages.2.attns.1.proj_q.weight"]
    broken["stages.0.attns.0.extra"] = torch.zeros(1)
    broken["cls_head.weight"] = torch.zeros(3, 128)
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn({"model": broken}, model)
    message = str(info.value)
    assert "stages.2.blocks.1.attn.proj_q.weight" in message
    assert "stages.0.blocks.0.attn.extra" in message
    assert "head.weight: (3, 128)" in message


def test_rpe_tables_of_another_resolution_are_resized(reference_dir):
    meta, _, official = _fixture(reference_dir, "dat_pp_small")
    model = DAT(**dict(meta["constructor_kwargs"], img_size=192))
    converted = checkpoint_filter_fn(official, model)
    assert converted["stages.0.blocks.1.attn.rpe_table"].shape == (1, 95, 95)
    model.load_state_dict(converted)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_from_local_official_file(reference_dir, tmp_path, suffix):
    meta, tensors, official = _fixture(reference_dir, "dat_pp_small")
    path = tmp_path / f"official{suffix}"
    if suffix == ".pth":
        torch.save({"model": official, "optimizer": {"state": {}}, "max_accuracy": 80.0, "epoch": 299}, path)
    else:
        save_file({k: v.contiguous() for k, v in official.items()}, path)
    model = timm.create_model(
        "dat_pp_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=16),
        **meta["constructor_kwargs"],
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=1e-4, rtol=0)


def test_dense_prediction_file_loads_features_only(reference_dir, tmp_path):
    """An mmdet/mmseg DAT++ file (backbone.* keys with output norms, no classifier) through plain timm."""
    meta, tensors, official = _fixture(reference_dir, "dat_pp_small")
    dense = {f"backbone.{k}": v for k, v in official.items() if not k.startswith(("cls_head", "cls_norm"))}
    for i, channels in enumerate(meta["constructor_kwargs"]["dims"]):
        dense.update({f"backbone.norms.{i}.norm.weight": torch.ones(channels),
                      f"backbone.norms.{i}.norm.bias": torch.zeros(channels)})
    dense["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "mask_rcnn_dat_pp.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": dense}, path)
    with pytest.warns(UserWarning, match="dense-prediction DAT backbone"):
        model = timm.create_model(
            "dat_pp_tiny", pretrained=True, features_only=True,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=16), **meta["constructor_kwargs"],
        ).eval()
    with torch.no_grad():
        features = model(tensors["input"])
    for i, feature in enumerate(features):
        torch.testing.assert_close(feature, tensors[f"stage{i}"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["dat_tiny", "dat_pp_tiny"])
@pytest.mark.parametrize("size", [(200, 333), (96, 160)])
def test_features_only_any_size(model_name, size):
    model = timm.create_model(model_name, features_only=True, out_indices=(1, 2, 3), pretrained=False,
                              depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), dim_stem=32,
                              heads=(1, 2, 4, 8), groups=(1, 1, 2, 4)).eval()
    assert model.feature_info.channels() == [64, 128, 256]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    for feature, stride, channels in zip(features, (8, 16, 32), (64, 128, 256)):
        assert feature.shape == (1, channels, -(-size[0] // stride), -(-size[1] // stride))
        assert torch.isfinite(feature).all()


def test_v1_runs_at_another_size(reference_dir):
    """A v1 model is not tied to its construction size (window masks and bias tables follow the input)."""
    meta, tensors, official = _fixture(reference_dir, "dat_v1_small")
    model = DAT(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official, model))
    with torch.no_grad():
        first = model.forward_intermediates(tensors["input"][:, :, :32, :48], indices=[0], intermediates_only=True)
    assert first[0].shape == (2, 16, 8, 12)


@pytest.mark.parametrize("model_name", ["dat_tiny", "dat_pp_tiny"])
def test_bad_inputs_raise_clear_errors(model_name):
    model = timm.create_model(model_name, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 64))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_and_pretrained_cfg(in_chans):
    model = timm.create_model("dat_pp_tiny", in_chans=in_chans, num_classes=7, depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 7)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.0" and cfg["classifier"] == "head"
    assert cfg["url"].startswith("https://cloud.tsinghua.edu.cn/f/")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["dat_tiny", "dat_pp_tiny"])
def test_export_matches_eager(model_name):
    model = timm.create_model(model_name, depths=(2, 2, 2, 2)).eval()
    x = torch.randn(2, 3, 64, 96)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


def _small(model_name):
    return timm.create_model(model_name, depths=(2, 2, 2, 2), dims=(32, 64, 128, 256), dim_stem=32,
                             heads=(1, 2, 4, 8), groups=(1, 1, 2, 4))


@pytest.mark.parametrize("model_name", ["dat_tiny", "dat_pp_tiny"])
def test_inference_fast_path_equals_autograd_path(model_name, monkeypatch):
    """Without autograd the blocks add residuals and apply GELU in place, the projections run through oneDNN, the
    attention through the extension's kernels and v1's MLPs on batch slices (forced here for every map): same values
    as the recorded path."""
    monkeypatch.setattr(_layers, "SLICE_BYTES", 1)
    model = _small(model_name).eval()
    x = torch.randn(2, 3, 100, 72)
    with torch.no_grad():
        fast = model(x)
    torch.testing.assert_close(fast, model(x), atol=1e-6, rtol=1e-6)


def _window_attention_by_roll(attn, x):
    """Shifted-window attention written plainly: pad, roll, partition, explicit softmax, reverse, roll back."""
    batch, channels, height, width = x.shape
    ws, heads = attn.window_size, attn.num_heads
    x = x.permute(0, 2, 3, 1)
    x = torch.nn.functional.pad(x, (0, 0, 0, -width % ws, 0, -height % ws))
    padded_h, padded_w = x.shape[1:3]
    x = torch.roll(x, (-attn.shift, -attn.shift), (1, 2))
    windows = x.reshape(batch, padded_h // ws, ws, padded_w // ws, ws, channels).transpose(2, 3)
    windows = windows.reshape(-1, ws * ws, channels)
    q, k, v = attn.proj_qkv(windows).reshape(len(windows), ws * ws, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    logits = logits + attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)
    if attn.shift:
        mask = attn._shift_mask(padded_h, padded_w, x.device)
        logits = (logits.reshape(batch, -1, heads, ws * ws, ws * ws) + mask[:, None]).flatten(0, 1)
    out = attn.proj_out((logits.softmax(-1) @ v).transpose(1, 2).reshape(len(windows), ws * ws, channels))
    out = out.reshape(batch, padded_h // ws, padded_w // ws, ws, ws, channels).transpose(2, 3)
    out = torch.roll(out.reshape(batch, padded_h, padded_w, channels), (attn.shift, attn.shift), (1, 2))
    return out[:, :height, :width].permute(0, 3, 1, 2)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_token_order_matches_roll_and_partition(shifted):
    attn = WindowAttention(16, 2, 7, shifted).double()
    x = torch.randn(2, 16, 17, 23, dtype=torch.float64, requires_grad=True)
    fast, plain = attn(x), _window_attention_by_roll(attn, x)
    torch.testing.assert_close(fast, plain)
    grad = torch.randn_like(fast)
    params = [x, attn.proj_qkv.weight, attn.relative_position_bias_table]
    for a, b in zip(torch.autograd.grad(fast, params, grad), torch.autograd.grad(plain, params, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("dim", "heads", "window_size", "shifted", "height", "width"),
    [(96, 3, 7, True, 21, 28), (96, 3, 7, False, 14, 14), (64, 1, 7, True, 7, 7), (16, 2, 7, True, 17, 23),
     (40, 2, 5, True, 9, 16), (48, 4, 4, True, 8, 12), (24, 2, 3, False, 10, 5)],
)
def test_window_attention_cpu_kernel_matches_roll_and_partition(
        extension_calls, dim, heads, window_size, shifted, height, width):
    """Inference on float32 CPU tensors runs the C++ kernel (padded maps, shifts with their region masks, head sizes
    of whole, partial and no vectors, windows whose token count is or is not a whole number of vectors)."""
    attn = WindowAttention(dim, heads, window_size, shifted).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, dim, height, width)
    with torch.inference_mode():
        out = attn(x)
    assert [(name, args[2:4]) for name, args in extension_calls] == [
        ("window_attention_forward", (window_size, attn.shift))]
    expected = _window_attention_by_roll(copy.deepcopy(attn).double(), x.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_window_attention_cpu_kernel_is_not_used_with_autograd_or_dropout(extension_calls):
    attn = WindowAttention(16, 2, 7, True)
    x = torch.randn(1, 16, 14, 14)
    attn(x).sum().backward()
    attn.attn_drop = 0.5
    with torch.no_grad():
        attn(x)
    assert extension_calls == [] and attn.proj_qkv.weight.grad is not None


def test_window_attention_trains_qkv_projection_alone(extension_calls):
    """With everything frozen but the qkv projection, and an input that needs no gradient, the projection still
    gets its gradient (the kernel, which has no backward, must not run)."""
    attn = WindowAttention(16, 2, 7, True)
    for name, param in attn.named_parameters():
        param.requires_grad_(name.startswith("proj_qkv.weight"))
    attn(torch.randn(1, 16, 14, 14)).sum().backward()
    assert extension_calls == [] and attn.proj_qkv.weight.grad is not None
