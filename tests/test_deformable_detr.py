"""Deformable DETR: official fixtures through the converter, every backbone x variant, training, bad input."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from shapes_training import train_on_batches
from timm.models._features import FeatureListNet
from torch import nn

from dat_smt.adapters import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeformableDETR,
    TimmBackbone,
    checkpoint_filter_fn,
    convert_official_checkpoint,
    create_detector,
)
from dat_smt.adapters.deformable_detr import DeformableTransformerEncoderLayer, encoder_reference_points

FIXTURES = [("deformable_detr_small", "refine"), ("deformable_detr_small_twostage", "twostage")]
TINY = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32, num_queries=8)
VARIANTS = {
    "single_scale": dict(num_feature_levels=1),
    "multi_scale": dict(num_feature_levels=4),
    "refine": dict(num_feature_levels=4, with_box_refine=True),
    "two_stage": dict(num_feature_levels=4, with_box_refine=True, two_stage=True),
}


class FixtureBody(nn.Module):
    """The stand-in CNN body the fixtures were made with (see the fixture sidecar ``backbone``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        widths = [(8, 8, 1), (8, 16, 2), (16, 24, 2), (24, 32, 2)]
        for i, (cin, cout, stride) in enumerate(widths, start=1):
            self.add_module(f"layer{i}", nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()))
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=f"layer{i}")
            for i, (c, r) in enumerate(zip([8, 16, 24, 32], [4, 8, 16, 32]), start=1)
        ]


def _fixture_model(reference_dir, name, variant):
    tensors = load_file(str(reference_dir / "fixtures" / f"{name}.safetensors"))
    sidecar = json.loads((reference_dir / "fixtures" / f"{name}.json").read_text())["variants"][variant]
    cfg = sidecar["config"]
    backbone = TimmBackbone(FeatureListNet(FixtureBody(), out_indices=(0, 1, 2, 3)), freeze_bn=False)
    model = DeformableDETR(
        backbone, cfg["num_classes"], num_queries=cfg["num_queries"], num_feature_levels=cfg["num_feature_levels"],
        with_box_refine=cfg["with_box_refine"], two_stage=cfg["two_stage"], d_model=cfg["d_model"],
        nhead=cfg["nhead"], num_encoder_layers=cfg["enc_layers"], num_decoder_layers=cfg["dec_layers"],
        dim_feedforward=cfg["dim_feedforward"], enc_n_points=cfg["n_points"], dec_n_points=cfg["n_points"],
    ).eval()
    prefix = f"{variant}.weights."
    official = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    return model, official, tensors, sidecar


@pytest.mark.parametrize("name, variant", FIXTURES)
def test_official_fixture_outputs_through_converter(reference_dir, name, variant):
    model, official, tensors, sidecar = _fixture_model(reference_dir, name, variant)
    convert_official_checkpoint({"model": official}, model)
    image, mask = tensors[f"{variant}.input.image"], tensors[f"{variant}.input.mask"].bool()
    with torch.no_grad():
        srcs, masks, pos = model.forward_features(image, mask)
        out = model.forward_detr(image, mask)

    def tolerance(key):
        # The float32-vs-float64 spread of the official run bounds honest float32 disagreement.
        return min(1e-4, 20 * max(sidecar["f32_vs_f64_max_abs_diff"].get(key, 1e-6), 1e-6))

    ref = {k[len(f"{variant}.f32."):]: v for k, v in tensors.items() if k.startswith(f"{variant}.f32.")}
    for lvl in range(4):
        torch.testing.assert_close(srcs[lvl], ref[f"src{lvl}"], atol=tolerance("memory"), rtol=0)
        assert torch.equal(masks[lvl], ref[f"mask{lvl}"].bool())
        if f"pos{lvl}" in ref:
            torch.testing.assert_close(pos[lvl], ref[f"pos{lvl}"], atol=1e-5, rtol=0)
    for key in ("memory", "hs", "init_reference", "inter_references", "pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], ref[key], atol=tolerance(key), rtol=0, msg=key)
    aux = out["aux_outputs"][0]
    torch.testing.assert_close(aux["pred_logits"], ref["aux_pred_logits"][0], atol=tolerance("pred_logits"), rtol=0)
    torch.testing.assert_close(aux["pred_boxes"], ref["aux_pred_boxes"][0], atol=tolerance("pred_boxes"), rtol=0)
    if variant == "twostage":
        enc = out["enc_outputs"]
        torch.testing.assert_close(enc["pred_logits"], ref["enc_outputs_class"], atol=tolerance("hs"), rtol=0)
        torch.testing.assert_close(enc["pred_boxes"], ref["enc_pred_boxes"], atol=tolerance("pred_boxes"), rtol=0)


def test_converter_is_strict(reference_dir):
    model, official, _, _ = _fixture_model(reference_dir, *FIXTURES[0])
    del official["transformer.level_embed"]
    official["transformer.unexpected.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \(1\): transformer.level_embed(.|\n)*unexpected"):
        checkpoint_filter_fn(official, model)


@pytest.mark.parametrize("size_divisibility", [1, 32])
def test_images_are_normalised_before_zero_padding(size_divisibility):
    """The official pipeline normalises every image, then pads the batch with zeros (nested_tensor_from_tensor_list)."""
    backbone = TimmBackbone(FeatureListNet(FixtureBody(), out_indices=(0, 1, 2, 3)), freeze_bn=False)
    model = DeformableDETR(backbone, 3, size_divisibility=size_divisibility, **TINY).eval()
    images = [torch.rand(3, 70, 90), torch.rand(3, 83, 61)]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    height, width = -(-83 // size_divisibility) * size_divisibility, -(-90 // size_divisibility) * size_divisibility
    expected = torch.zeros(2, 3, height, width)
    expected_mask = torch.ones(2, height, width, dtype=torch.bool)
    for i, image in enumerate(images):
        expected[i, :, :image.shape[1], :image.shape[2]] = (image - mean) / std
        expected_mask[i, :image.shape[1], :image.shape[2]] = False
    seen = []
    forward_detr = model.forward_detr
    model.forward_detr = lambda batch, mask: seen.append((batch, mask)) or forward_detr(batch, mask)
    with torch.no_grad():
        model(images)
    torch.testing.assert_close(seen[0][0], expected)
    assert torch.equal(seen[0][1], expected_mask)


def test_converter_maps_official_torchvision_resnet50_backbone():
    import torchvision

    model = create_detector("deformable_detr", backbone="resnet50", num_classes=3, **TINY)
    official = {
        f"backbone.0.body.{k}": v for k, v in torchvision.models.resnet50().state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    official.update({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")})
    official["backbone.0.body.layer3.2.bn2.running_var"] = torch.full((256,), 3.0)
    convert_official_checkpoint({"model": official}, model)
    assert torch.equal(model.backbone.body.layer3[2].bn2.running_var, torch.full((256,), 3.0))


def _forward_backward(backbone, variant):
    if not timm.is_model(backbone):
        pytest.skip(f"{backbone} is not registered with timm in this build")
    model = create_detector("deformable_detr", backbone=backbone, num_classes=3, **TINY, **VARIANTS[variant])
    images = [torch.rand(3, 70, 90), torch.rand(3, 83, 61)]
    targets = [
        {"boxes": torch.tensor([[5.0, 8.0, 40.0, 60.0], [50.0, 10.0, 80.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([1])},
    ]
    losses = model.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.input_proj[0][0].weight.grad is not None
    detections = model.eval()(images)
    assert [d["boxes"].shape[1] for d in detections] == [4, 4]
    assert (detections[1]["boxes"][:, 2] <= 61).all() and (detections[1]["boxes"][:, 3] <= 83).all()
    return losses


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_forward_backward(variant):
    losses = _forward_backward("resnet18", variant)
    expected_suffixes = {"", "_0"} | ({"_enc"} if variant == "two_stage" else set())
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in expected_suffixes}


def test_channels_last_backbone_forward_backward():
    _forward_backward("swin_tiny_patch4_window7_224", "refine")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "backbone", ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "dat_tiny", "dat_pp_tiny", "smt_tiny"]
)
def test_backbone_variant_matrix(backbone, variant):
    _forward_backward(backbone, variant)


def _tiny_model(**options):
    return create_detector("deformable_detr", backbone="resnet18", num_classes=3, **TINY, **options).train()


@pytest.mark.parametrize(
    "target, error, match",
    [
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([3])}, ValueError, "labels"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([-1])}, ValueError, "labels"),
        ({"boxes": torch.tensor([[6.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}, ValueError, "x2 >= x1"),
        ({"boxes": torch.tensor([[1.0, float("nan"), 5.0, 5.0]]), "labels": torch.tensor([0])}, ValueError, "NaN"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0, 1])}, ValueError, "labels"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0.5])}, TypeError, "integers"),
        ({"labels": torch.tensor([0])}, ValueError, "boxes"),
    ],
)
def test_bad_targets_raise_clear_errors(target, error, match):
    with pytest.raises(error, match=match):
        _tiny_model()([torch.rand(3, 40, 40)], [target])


def test_bad_images_raise_clear_errors():
    model = _tiny_model().eval()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model([torch.rand(1, 40, 40)])
    with pytest.raises(ValueError, match="targets must be given"):
        model.train()([torch.rand(3, 40, 40)])


def test_empty_degenerate_and_outside_boxes_train_without_nan():
    model = _tiny_model(two_stage=True, with_box_refine=True)
    images = [torch.rand(3, 70, 60), torch.rand(3, 40, 45), torch.rand(3, 40, 45)]
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[10.0, 5.0, 10.0, 30.0], [5.0, 7.0, 20.0, 7.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[-20.0, -5.0, 30.0, 80.0], [50.0, 50.0, 70.0, 90.0]]), "labels": torch.tensor([2, 1])},
    ]
    prepared = model.prepare_targets(targets, [(70, 60), (40, 45), (40, 45)], "cpu")
    assert prepared[2]["boxes"].min() >= 0 and prepared[2]["boxes"].max() <= 1
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    empty_only = model([images[0]], [targets[0]])
    assert all(torch.isfinite(v) for v in empty_only.values())
    assert empty_only["loss_bbox"] == 0 and empty_only["loss_ce"] > 0


@pytest.mark.slow
def test_short_training_on_shapes_reaches_nontrivial_ap():
    """A seeded CPU run fits 16 generated images: the loss falls and pycocotools AP50 on them becomes high."""
    from dat_smt.adapters import evaluate_coco
    from dat_smt.shapes import ShapesDetectionDataset

    torch.manual_seed(0)
    dataset = ShapesDetectionDataset(16, min_size=64, max_size=80, seed=0, max_objects=1, num_classes=4)
    data = [dataset[i] for i in range(len(dataset))]
    model = create_detector(
        "deformable_detr", backbone="resnet18", num_classes=4, d_model=64, nhead=4, num_encoder_layers=1,
        num_decoder_layers=2, dim_feedforward=128, num_queries=8, with_box_refine=True, dropout=0.0,
        backbone_kwargs=dict(trainable_stages=-1, freeze_bn=False),
    )
    before = evaluate_coco(model, data)
    losses = train_on_batches(model, data, steps=120, lr=1e-3)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
    after = evaluate_coco(model, data)
    assert before["AP50"] < 0.1 and after["AP50"] > 0.5, (before, after)


def _encoder_layer_inputs(batch, masked):
    torch.manual_seed(0)
    shapes = torch.tensor([[40, 60], [20, 30], [10, 15], [5, 8]])
    sizes = shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    src, pos = torch.randn(batch, tokens, 32), torch.randn(batch, tokens, 32)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    valid_ratios = torch.ones(batch, 4, 2)
    if masked:
        # The last image is padded on the right: its rightmost quarter of every level.
        for (h, w), start in zip(shapes.tolist(), level_start_index.tolist()):
            mask[-1, start:start + h * w].view(h, w)[:, w - w // 4:] = True
        valid_ratios[-1, :, 0] = torch.tensor([(w - w // 4) / w for w in shapes[:, 1].tolist()])
    return src, pos, encoder_reference_points(shapes, valid_ratios), shapes, level_start_index, mask if masked else None


def _plain_encoder_layer(layer, src, pos, reference_points, shapes, level_start_index, mask):
    attn = layer.self_attn(src + pos, reference_points, src, shapes, level_start_index, mask)
    x = layer.norm1(src + attn)
    return layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))


def _count_ffn_passes(layer):
    passes = []
    layer.linear1.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    return passes


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_encoder_layer_inference_ffn_in_token_chunks_matches_plain_layer(batch, masked):
    # 3190 tokens x 1024 hidden floats per image is above the 8 MB chunk, so the FFN runs in chunks of 2048
    # tokens, one of them spanning both images at batch 2.
    inputs = _encoder_layer_inputs(batch, masked)
    layer = DeformableTransformerEncoderLayer(d_model=32, d_ffn=1024, n_heads=4).eval()
    passes = _count_ffn_passes(layer)
    src_before = inputs[0].clone()
    with torch.no_grad():
        out = layer(inputs[0], *inputs[1:])
        chunks = len(passes)
        expected = _plain_encoder_layer(layer, *inputs)
    assert chunks == -(-batch * 3190 // 2048) > 1
    torch.testing.assert_close(out, expected)
    assert torch.equal(inputs[0], src_before)


@pytest.mark.parametrize("train", [True, False])
def test_encoder_layer_with_autograd_keeps_the_plain_ffn_and_its_gradients(train):
    src, *inputs = _encoder_layer_inputs(2, True)
    layer = DeformableTransformerEncoderLayer(d_model=32, d_ffn=1024, dropout=0.0, n_heads=4).train(train)
    passes = _count_ffn_passes(layer)
    src = src.requires_grad_()
    out = layer(src, *inputs)
    assert len(passes) == 1
    grads = torch.autograd.grad(out.square().sum(), [src, *layer.parameters()])
    expected = _plain_encoder_layer(layer, src, *inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), [src, *layer.parameters()])
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
