"""The shared DETR toolkit: batching, position embeddings, matcher, criterion, post-processing, backbone adapter."""
import itertools
import math

import pytest
import timm
import torch
from torchvision.ops import generalized_box_iou
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from dat_smt.adapters import (
    HungarianMatcher,
    PositionEmbeddingSine,
    SetCriterion,
    TimmBackbone,
    batch_images,
    box_cxcywh_to_xyxy,
    box_sine_embedding,
    box_xyxy_to_cxcywh,
    build_backbone,
    create_detector,
    list_detectors,
)
from dat_smt.adapters.backbone import FrozenBatchNorm2d


def test_batch_images_pads_to_divisible_size_with_mask():
    images = [torch.rand(3, 37, 50), torch.rand(3, 61, 20)]
    batch, mask, sizes = batch_images(images, size_divisibility=32)
    assert batch.shape == (2, 3, 64, 64) and mask.shape == (2, 64, 64)
    assert sizes == [(37, 50), (61, 20)]
    assert torch.equal(batch[0, :, :37, :50], images[0]) and batch[0, :, 37:].abs().sum() == 0
    assert (~mask[0]).sum() == 37 * 50 and (~mask[1]).sum() == 61 * 20
    assert not mask[1, :61, :20].any() and mask[1, :, 20:].all()


def test_batch_images_accepts_padded_batch():
    batch, mask, sizes = batch_images(torch.rand(2, 3, 40, 48), size_divisibility=1)
    assert batch.shape == (2, 3, 40, 48) and not mask.any() and sizes == [(40, 48)] * 2


@pytest.mark.parametrize(
    "images, error",
    [
        ([torch.rand(1, 32, 32)], ValueError),
        ([torch.rand(4, 32, 32)], ValueError),
        ([torch.rand(32, 32)], ValueError),
        ([torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)], TypeError),
        ([torch.full((3, 8, 8), float("nan"))], ValueError),
        (torch.rand(3, 32, 32), ValueError),
        ([], TypeError),
        (["not an image"], TypeError),
    ],
)
def test_batch_images_rejects_bad_input(images, error):
    with pytest.raises(error):
        batch_images(images)


def _position_embedding_by_formula(mask: torch.Tensor, num_pos_feats: int, offset: float) -> torch.Tensor:
    """Element-by-element evaluation of the DETR sine embedding definition."""
    _, height, width = mask.shape
    out = torch.zeros(mask.shape[0], 2 * num_pos_feats, height, width, dtype=torch.float64)
    for b in range(mask.shape[0]):
        valid_h = int((~mask[b, :, 0]).sum())
        valid_w = int((~mask[b, 0, :]).sum())
        for i in range(height):
            for j in range(width):
                y = (min(i + 1, valid_h) + offset) / (valid_h + 1e-6) * 2 * math.pi
                x = (min(j + 1, valid_w) + offset) / (valid_w + 1e-6) * 2 * math.pi
                for k in range(num_pos_feats):
                    dim_t = 10000 ** (2 * (k // 2) / num_pos_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = trig(y / dim_t)
                    out[b, num_pos_feats + k, i, j] = trig(x / dim_t)
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_position_embedding_sine_matches_formula(offset):
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    pos = PositionEmbeddingSine(8, offset=offset)(mask)
    expected = _position_embedding_by_formula(mask, 8, offset)
    valid = ~mask[:, None].expand_as(pos)
    torch.testing.assert_close(pos.double()[valid], expected[valid], atol=1e-5, rtol=0)


def test_box_sine_embedding_layout():
    boxes = torch.rand(2, 3, 4)
    emb = box_sine_embedding(boxes, num_pos_feats=6)
    assert emb.shape == (2, 3, 24)
    for c in range(4):
        for k in range(6):
            trig = torch.sin if k % 2 == 0 else torch.cos
            expected = trig(boxes[..., c] * 2 * math.pi / 10000 ** (2 * (k // 2) / 6))
            torch.testing.assert_close(emb[..., c * 6 + k], expected)


def _brute_force_cost(matcher, logits, boxes, target):
    prob = logits.sigmoid()
    total = torch.zeros(len(boxes), len(target["labels"]))
    for q in range(len(boxes)):
        for t, label in enumerate(target["labels"].tolist()):
            p = prob[q, label]
            focal = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
            l1 = (boxes[q] - target["boxes"][t]).abs().sum()
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[q:q + 1]), box_cxcywh_to_xyxy(target["boxes"][t:t + 1]))
            total[q, t] = matcher.cost_class * focal + matcher.cost_bbox * l1 - matcher.cost_giou * giou[0, 0]
    return total


def _random_boxes(n, generator):
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], 1)


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_targets, num_classes = 5, 1 + seed % 4, 3
    logits = torch.randn(1, num_queries, num_classes, generator=g)
    boxes = _random_boxes(num_queries, g)[None]
    target = {"labels": torch.randint(0, num_classes, (num_targets,), generator=g),
              "boxes": _random_boxes(num_targets, g)}
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    cost = _brute_force_cost(matcher, logits[0], boxes[0], target)
    torch.testing.assert_close(matcher.cost_matrix(logits[0], boxes[0], target), cost, atol=1e-5, rtol=1e-5)
    best = min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), num_targets)
    )
    (rows, cols), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
    assert len(rows) == num_targets and sorted(cols.tolist()) == list(range(num_targets))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_handles_images_without_targets():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs = {"pred_logits": torch.randn(1, 4, 2), "pred_boxes": torch.rand(1, 4, 4)}
    (rows, cols), = HungarianMatcher()(outputs, [empty])
    assert rows.numel() == 0 and cols.numel() == 0


def test_set_criterion_matches_hand_computed_losses():
    # Two queries, one target matched to query 1 by a fixed matcher: every term can be written by hand.
    class FixedMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            return [(torch.tensor([1]), torch.tensor([0]))]

    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.4]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}
    criterion = SetCriterion(2, FixedMatcher(), {"loss_ce": 1, "loss_bbox": 1, "loss_giou": 1})
    losses = criterion({"pred_logits": logits, "pred_boxes": pred}, [target])

    def focal(x, t):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        a_t = 0.25 if t else 0.75
        return -a_t * (1 - p_t) ** 2 * math.log(p_t)

    expected_ce = focal(0.5, 0) + focal(-1.0, 0) + focal(2.0, 1) + focal(0.0, 0)
    # pred box 1 is x in [0.3, 0.5], y in [0.3, 0.7]; target x in [0.4, 0.6]: IoU = 0.04 / 0.12, hull = union.
    expected_giou = 1 - 0.04 / 0.12
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(expected_giou, rel=1e-5)


def test_set_criterion_aux_and_encoder_losses_use_suffixes_and_class_agnostic_targets():
    logits = torch.randn(1, 4, 3)
    boxes = _random_boxes(4, torch.Generator().manual_seed(0))[None]
    target = {"labels": torch.tensor([2]), "boxes": _random_boxes(1, torch.Generator().manual_seed(1))}
    outputs = {
        "pred_logits": logits, "pred_boxes": boxes,
        "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}],
        "enc_outputs": {"pred_logits": logits, "pred_boxes": boxes},
    }
    criterion = SetCriterion(3)
    losses = criterion(outputs, [target])
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_enc")}
    assert losses["loss_ce_0"].item() == pytest.approx(losses["loss_ce"].item())
    agnostic = criterion({"pred_logits": logits, "pred_boxes": boxes}, [{**target, "labels": torch.tensor([0])}])
    assert losses["loss_ce_enc"].item() == pytest.approx(agnostic["loss_ce"].item())


def test_postprocess_round_trips_absolute_boxes():
    model = create_detector("deformable_detr", backbone="resnet18", num_classes=3, d_model=32, nhead=4,
                            num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, num_queries=4,
                            num_detections=12).eval()
    sizes = [(50, 70), (64, 33)]
    abs_boxes = [torch.tensor([[5.0, 6.0, 40.0, 30.0]]), torch.tensor([[1.0, 2.0, 30.0, 60.0]])]
    targets = model.prepare_targets([{"boxes": b, "labels": torch.tensor([1])} for b in abs_boxes], sizes, "cpu")
    logits = torch.full((2, 4, 3), -5.0)
    pred_boxes = torch.rand(2, 4, 4) * 0.5 + 0.25
    for b, target in enumerate(targets):
        logits[b, 2, 1] = 5.0
        pred_boxes[b, 2] = target["boxes"][0]
    detections = model.postprocess({"pred_logits": logits, "pred_boxes": pred_boxes}, sizes)
    for det, boxes in zip(detections, abs_boxes):
        assert det["boxes"].shape == (12, 4) and det["labels"][0] == 1
        assert det["scores"][0] == pytest.approx(1 / (1 + math.exp(-5.0)))
        torch.testing.assert_close(det["boxes"][0], boxes[0], atol=1e-4, rtol=0)


def test_box_conversions_are_inverse():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


@pytest.mark.parametrize("name", ["resnet18", "swin_tiny_patch4_window7_224"])
def test_timm_backbone_strides_channels_layout_and_masks(name):
    backbone = TimmBackbone(name, out_strides=(8, 16, 32))
    images, mask, _ = batch_images([torch.rand(3, 70, 90), torch.rand(3, 45, 100)])
    features, masks = backbone(images, mask)
    assert backbone.strides == [8, 16, 32]
    for feature, level_mask, channels, stride in zip(features, masks, backbone.channels, backbone.strides):
        assert feature.shape == (2, channels, 96 // stride, 128 // stride)
        assert level_mask.shape == (2, *feature.shape[-2:])
    # image 1 is 45 x 100 in a 96 x 128 batch: nearest sampling of the stride-8 map reads image rows/cols 8 * i
    assert not masks[0][1, :6, :13].any() and masks[0][1, 6:].all() and masks[0][1, :, 13:].all()


@pytest.mark.parametrize("out_strides", [(8, 16, 32), (32,)])
def test_timm_backbone_freezes_batchnorm_and_early_stages(out_strides):
    backbone = TimmBackbone("resnet18", out_strides=out_strides)
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    everything = TimmBackbone("resnet18", trainable_stages=-1, freeze_bn=False)
    assert all(p.requires_grad for p in everything.parameters())


def test_one_pass_frozen_batchnorm_matches_torchvision():
    torchvision_bn = TorchvisionFrozenBatchNorm2d(16, eps=1e-3)
    for name in ("weight", "bias", "running_mean"):
        getattr(torchvision_bn, name).normal_()
    torchvision_bn.running_var.uniform_(0.5, 2.0)
    bn = FrozenBatchNorm2d(16, eps=1e-3)
    bn.load_state_dict(torchvision_bn.state_dict())
    x = torch.randn(2, 16, 9, 7)
    torch.testing.assert_close(bn(x), torchvision_bn(x), rtol=1e-6, atol=1e-6)
    assert isinstance(bn, TorchvisionFrozenBatchNorm2d)


def test_timm_backbone_channels_last_gives_the_same_maps():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18").eval()
    channels_last = TimmBackbone("resnet18", channels_last=True).eval()
    channels_last.load_state_dict(backbone.state_dict())
    images, mask, _ = batch_images([torch.rand(3, 70, 90), torch.rand(3, 45, 100)])
    with torch.no_grad():
        (expected, expected_masks), (actual, actual_masks) = backbone(images, mask), channels_last(images, mask)
    for e, a, em, am in zip(expected, actual, expected_masks, actual_masks):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
        assert torch.equal(am, em)


def test_build_backbone_options_and_errors():
    backbone = build_backbone("resnet18", (32,), backbone_kwargs={"out_strides": (16, 32), "trainable_stages": -1})
    assert backbone.strides == [16, 32] and all(p.requires_grad for p in backbone.parameters())
    assert build_backbone(backbone) is backbone
    with pytest.raises(ValueError, match="already built TimmBackbone"):
        build_backbone(backbone, backbone_kwargs={"freeze_bn": False})
    with pytest.raises(ValueError, match="given by name"):
        build_backbone(timm.create_model("resnet18", features_only=True), pretrained=True)


def test_timm_backbone_rejects_missing_strides_and_non_feature_models():
    with pytest.raises(ValueError, match="stride"):
        TimmBackbone("resnet18", out_strides=(8, 64))
    with pytest.raises(TypeError, match="features_only"):
        TimmBackbone(timm.create_model("resnet18"))


def test_registry():
    assert "deformable_detr" in list_detectors()
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector("no_such_detector")


@pytest.mark.parametrize("detector, options", [
    ("deformable_detr", {}),
    ("focus_detr", {"topk_sa": 4, "dn_number": 2}),
])
def test_one_channel_group_norm_on_a_1x1_level_at_batch_size_one(detector, options):
    """d_model 32 gives the GroupNorm(32) input projections one channel per group, so a 1x1 coarsest level has one
    value per group. An image alone (this raised in F.group_norm) gets the detections it gets next to another image,
    and a batch of one trains."""
    model = create_detector(detector, backbone="resnet18", num_classes=3, d_model=32, nhead=4, num_encoder_layers=1,
                            num_decoder_layers=1, dim_feedforward=32, num_queries=5, **options).eval()
    coarsest = []
    model.input_proj[-1].register_forward_hook(lambda module, inputs, output: coarsest.append(output.shape))
    image, other = torch.rand(3, 60, 50), torch.rand(3, 60, 50)
    with torch.no_grad():
        alone = model([image])[0]
        paired = model([image, other])[0]
    assert coarsest == [(1, 32, 1, 1), (2, 32, 1, 1)]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(alone[key], paired[key])
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    losses = model.train()([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.input_proj[-1][1].bias.grad.abs().sum() > 0


def _randomised_frozen_bn_state(model: torch.nn.Module) -> dict:
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "bias")):
            value = value + 0.2 * torch.randn(value.shape, generator=generator)
        elif key.endswith("running_var") or (key.endswith("weight") and value.dim() == 1):
            value = value * (0.5 + torch.rand(value.shape, generator=generator))
        state[key] = value
    return state


def test_folded_frozen_batchnorm_matches_unfolded_values_gradients_and_keys():
    from dat_smt.adapters.backbone import FoldedFrozenBatchNorm2d, FrozenBatchNormConv2d

    torch.manual_seed(0)
    unfolded = TimmBackbone("resnet18", fold_frozen_bn=False)
    folded = TimmBackbone("resnet18")
    assert list(folded.state_dict()) == list(unfolded.state_dict())
    # every conv + BN of resnet18: stem, 2 x 8 in the blocks, 3 downsamples
    assert sum(type(m) is FrozenBatchNormConv2d for m in folded.modules()) == 20
    assert sum(type(m) is FoldedFrozenBatchNorm2d for m in folded.modules()) == 20
    state = _randomised_frozen_bn_state(unfolded)
    unfolded.load_state_dict(state)
    folded.load_state_dict(state)  # loaded after folding: the folded convolutions read the live buffers
    images, mask, _ = batch_images([torch.rand(3, 70, 90), torch.rand(3, 45, 100)])
    expected, _ = unfolded.train()(images, mask)
    actual, _ = folded.train()(images, mask)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    sum(e.square().sum() for e in expected).backward()
    sum(a.square().sum() for a in actual).backward()
    unfolded_params = dict(unfolded.named_parameters())
    for name, param in folded.named_parameters():
        assert param.requires_grad == unfolded_params[name].requires_grad
        if param.requires_grad:
            torch.testing.assert_close(param.grad, unfolded_params[name].grad, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in folded.state_dict().items())
    # inference keeps the folded weights until a parameter or buffer changes
    with torch.no_grad():
        for _ in range(2):
            for a, e in zip(folded.eval()(images, mask)[0], unfolded.eval()(images, mask)[0]):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        for model in (folded, unfolded):
            model.body.layer4[1].bn2.running_mean.add_(0.5)
            model.body.layer4[1].conv2.weight.mul_(1.5)
        for a, e in zip(folded(images, mask)[0], unfolded(images, mask)[0]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_fold_frozen_batchnorm_leaves_convolutions_read_elsewhere():
    from dat_smt.adapters.backbone import FrozenBatchNormConv2d, fold_frozen_batch_norm

    class RawOutputReused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = FrozenBatchNorm2d(4)
            self.conv2 = torch.nn.Conv2d(4, 4, 1)
            self.bn2 = FrozenBatchNorm2d(4)

        def forward(self, x):
            raw = self.conv(x)
            x = self.bn2(self.conv2(self.bn(raw)))
            return x + raw

    model = RawOutputReused()
    assert fold_frozen_batch_norm(model, torch.rand(1, 3, 8, 8)) == 0
    assert not any(isinstance(m, FrozenBatchNormConv2d) for m in model.modules())
