"""Focus-DETR detector: builds and trains on timm backbones, sparse encoder behaviour, seeded training to AP."""
import itertools
import math

import pytest
import timm
import torch
from shapes_training import train_on_batches

import dat_smt  # noqa: F401  (registers the dat_smt backbones with timm where available)
from dat_smt.adapters import FocusDETR, create_detector, list_detectors

TINY = dict(
    d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, num_queries=12,
    topk_sa=8, dn_number=4,
)


def _images_and_targets():
    images = [torch.rand(3, 75, 101), torch.rand(3, 45, 38)]  # odd sizes, second one tiny
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 60.0, 50.0], [30.0, 20.0, 45.0, 70.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    return images, targets


BACKBONES = ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "dat_tiny", "dat_pp_tiny", "smt_tiny"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_builds_and_trains_a_step(backbone):
    if not timm.is_model(backbone):
        pytest.skip(f"timm has no model {backbone!r} registered in this build")
    torch.manual_seed(0)
    model = create_detector("focus_detr", backbone=backbone, num_classes=3, **TINY)
    assert isinstance(model, FocusDETR) and "focus_detr" in list_detectors()
    assert model.strides == [8, 16, 32, 64]
    images, targets = _images_and_targets()
    model.train()
    losses = model(images, targets)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_enc", "loss_ce_dn", "loss_ce_dn_0",
                "loss_select"}
    assert expected <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.encoder.selector.scorer.head[-1].weight.grad.abs().sum() > 0
    assert model.denoising.label_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for detection, image in zip(detections, images):
        h, w = image.shape[1:]
        assert detection["boxes"].shape[1] == 4 and len(detection["scores"]) == len(detection["labels"])
        assert (detection["boxes"][:, 2] <= w).all() and (detection["boxes"][:, 3] <= h).all()


def test_keep_ratio_controls_updated_tokens_and_denoising_is_training_only():
    torch.manual_seed(0)
    images, targets = _images_and_targets()
    sparse = create_detector("focus_detr", backbone="resnet18", num_classes=3, keep_ratio=0.5, **TINY).eval()
    dense = create_detector("focus_detr", backbone="resnet18", num_classes=3, keep_ratio=1.0, cascade=[1.0] * 6,
                            **TINY).eval()
    dense.load_state_dict(sparse.state_dict())
    batch = torch.rand(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        out_sparse = sparse.forward_detr(batch, mask)
        out_dense = dense.forward_detr(batch, mask)
    tokens = out_sparse["memory"].shape[1]
    assert out_dense["foreground_indices"][0].shape[1] == tokens  # int(1.0 * S) + 1 capped at S
    assert out_sparse["foreground_indices"][0].shape[1] == tokens // 2 + 1
    assert out_sparse["foreground_indices"][1].shape[1] == math.floor(0.8 * (tokens // 2 + 1))
    assert "dn_outputs" not in out_sparse  # no denoising queries at inference
    sparse.train()
    out = sparse.forward_detr(batch, mask, [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]),
                                             "labels": torch.tensor([1])}], [(96, 128)])
    assert out["dn_outputs"][0]["pred_logits"].shape[1] == out["dn_num_groups"] * out["dn_group_size"]
    assert out["pred_logits"].shape[1] == TINY["num_queries"]


def test_small_input_keeps_fewer_queries_and_tokens():
    torch.manual_seed(0)
    options = {**TINY, "num_queries": 900, "topk_sa": 300, "d_model": 64}
    model = create_detector("focus_detr", backbone="resnet18", num_classes=3, **options).eval()
    with torch.no_grad():
        # 64x64 padded input: 8x8 + 4x4 + 2x2 + 1x1 tokens, fewer than the 900 queries and 300 SA tokens.
        # (d_model 64: GroupNorm(32) needs more than one value per group on the 1x1 level.)
        detections = model([torch.rand(3, 33, 40)])
    assert len(detections[0]["scores"]) > 0


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_detector("focus_detr", backbone="resnet18", num_classes=3, **{**TINY, "d_model": 48})
    with pytest.raises(ValueError, match="cascade"):
        create_detector("focus_detr", backbone="resnet18", num_classes=3, **{**TINY, "num_encoder_layers": 7})


def _official_focus_detr_names(model):
    """detrex names of the official Focus-DETR checkpoint (written from the release's module layout), each with
    the shape of the parameter it should fill."""
    ours = model.state_dict()
    names = {
        "transformer.level_embeds": ours["encoder.level_embed"],
        "transformer.alpha": ours["encoder.selector.alpha"],
        "transformer.tgt_embed.weight": ours["tgt_embed.weight"],
        "label_enc.weight": ours["denoising.label_embed.weight"],
    }
    necks = [(f"neck.convs.{i}", i) for i in range(3)] + [("neck.extra_convs.0", 3)]
    for (neck, level), (part, index) in itertools.product(necks, (("conv", 0), ("norm", 1))):
        for name in ("weight", "bias"):
            names[f"{neck}.{part}.{name}"] = ours[f"input_proj.{level}.{index}.{name}"]
    for part in ("weight", "bias"):
        names[f"transformer.enc_output.{part}"] = ours[f"encoder.input_proj.{part}"]
        names[f"transformer.enc_output_norm.{part}"] = ours[f"encoder.input_norm.{part}"]
        names[f"transformer.decoder.norm.{part}"] = ours[f"decoder.norm.{part}"]
        for j in range(2):
            head = f"decoder.ref_point_head.layers.{j}.{part}"
            names[f"transformer.{head}"] = ours[head]
        for official, mine in (("layer1.0", "embed.0"), ("layer1.1", "embed.1"), ("layer2.0", "head.0"),
                               ("layer2.2", "head.2"), ("layer2.4", "head.4")):
            names[f"transformer.enc_mask_predictor.{official}.{part}"] = ours[f"encoder.selector.scorer.{mine}.{part}"]
        for i in range(3):
            names[f"class_embed.{i}.{part}"] = ours[f"class_embed.{i}.{part}"]
            names[f"transformer.decoder.class_embed.{i}.{part}"] = ours[f"class_embed.{i}.{part}"]  # alias
            for j in range(3):
                names[f"bbox_embed.{i}.layers.{j}.{part}"] = ours[f"bbox_embed.{i}.layers.{j}.{part}"]
        msda = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for i in range(2):
            enc, dec = f"transformer.encoder.layers.{i}.", f"transformer.decoder.layers.{i}."
            for name in msda:
                names[f"{enc}attentions.1.{name}.{part}"] = ours[f"encoder.layers.{i}.cross_attn.{name}.{part}"]
                names[f"{dec}attentions.1.{name}.{part}"] = ours[f"decoder.layers.{i}.cross_attn.{name}.{part}"]
            for prefix, layer in ((enc, "encoder"), (dec, "decoder")):
                attn = f"{layer}.layers.{i}.self_attn"
                names[f"{prefix}attentions.0.attn.out_proj.{part}"] = ours[f"{attn}.out_proj.{part}"]
                names[f"{prefix}attentions.0.attn.in_proj_{part}"] = ours[f"{attn}.in_proj_{part}"]
                names[f"{prefix}ffns.0.layers.0.0.{part}"] = ours[f"{layer}.layers.{i}.linear1.{part}"]
                names[f"{prefix}ffns.0.layers.1.{part}"] = ours[f"{layer}.layers.{i}.linear2.{part}"]
                names[f"{prefix}norms.0.{part}"] = ours[f"{layer}.layers.{i}.norm1.{part}"]
                names[f"{prefix}norms.1.{part}"] = ours[f"{layer}.layers.{i}.norm2.{part}"]
            names[f"{enc}norm2.{part}"] = ours[f"encoder.layers.{i}.self_attn_norm.{part}"]
            names[f"{dec}norms.2.{part}"] = ours[f"decoder.layers.{i}.norm3.{part}"]
    return {k: torch.randn_like(v) for k, v in names.items()}


def test_official_checkpoint_converter_is_strict():
    from test_focus_detr import _detectron2_resnet50_keys

    from dat_smt.adapters.focus_detr_convert import convert_official_focus_detr_state_dict

    model = create_detector("focus_detr", backbone="resnet50", num_classes=3, **TINY)
    official = _official_focus_detr_names(model)
    official.update(_detectron2_resnet50_keys(model.backbone.body))
    model.load_state_dict(convert_official_focus_detr_state_dict(official, model))
    torch.testing.assert_close(
        model.decoder.layers[1].norm3.weight, official["transformer.decoder.layers.1.norms.2.weight"]
    )
    torch.testing.assert_close(model.input_proj[3][1].bias, official["neck.extra_convs.0.norm.bias"])
    torch.testing.assert_close(model.class_embed[2].bias, official["class_embed.2.bias"])  # not the alias
    torch.testing.assert_close(
        model.backbone.body.layer4[2].bn3.weight, official["backbone.res5.2.conv3.norm.weight"]
    )
    del official["transformer.decoder.ref_point_head.layers.1.bias"]
    with pytest.raises(ValueError, match="decoder.ref_point_head.layers.1.bias"):
        convert_official_focus_detr_state_dict(official, model)


@pytest.mark.slow
def test_short_seeded_training_reaches_nontrivial_ap():
    from dat_smt.adapters import evaluate_coco
    from dat_smt.shapes import ShapesDetectionDataset

    torch.manual_seed(0)
    dataset = ShapesDetectionDataset(8, min_size=64, max_size=80, seed=0, max_objects=2, num_classes=2)
    model = create_detector(
        "focus_detr", backbone="resnet18", num_classes=2, d_model=64, nhead=4, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=128, num_queries=20, topk_sa=16, dn_number=10,
        backbone_kwargs={"trainable_stages": -1},
    )
    losses = train_on_batches(model, dataset, steps=60, lr=2e-3)
    assert losses[-1] < 0.5 * losses[0]
    metrics = evaluate_coco(model, dataset)
    assert metrics["AP50"] > 0.1, metrics
