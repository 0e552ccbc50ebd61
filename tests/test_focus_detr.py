"""Focus-DETR: the official encoder fixture, the token selector, label assignment, sparse encoder behaviour."""
import json

import pytest
import timm
import torch
from torch import nn

from dat_smt.adapters import encoder_reference_points, utils
from dat_smt.adapters.focus_detr_convert import (
    convert_detectron2_resnet_state_dict,
    convert_focus_encoder_state_dict,
)
from dat_smt.adapters.focus_detr_encoder import DualAttentionEncoderLayer, FocusEncoder
from dat_smt.adapters.focus_detr_selector import (
    ForegroundTokenSelector,
    cascade_token_indices,
    foreground_targets,
    level_size_ranges,
    selector_focal_loss,
)


@pytest.fixture(scope="module")
def encoder_fixture(reference_dir):
    safetensors = pytest.importorskip("safetensors.torch")
    path = reference_dir / "fixtures" / "focus_detr_encoder_small.safetensors"
    if not path.exists():
        pytest.skip(f"fixture {path} not found")
    tensors = safetensors.load_file(str(path))
    config = json.loads(path.with_suffix(".json").read_text())["config"]
    weights = {k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")}
    encoder = FocusEncoder(
        d_model=config["embed_dim"],
        n_heads=config["num_heads"],
        num_layers=config["enc_layers"],
        ffn_dim=config["enc_ffn"],
        n_levels=config["num_feature_levels"],
        topk_sa=config["topk_sa"],  # the sidecar's reduced fine-grained token count
    ).eval()
    encoder.load_state_dict(convert_focus_encoder_state_dict(weights, prefix="", model=encoder))
    class_head = nn.Linear(config["embed_dim"], config["num_classes"])
    class_head.load_state_dict(
        {k.split(".")[-1]: v for k, v in weights.items() if k.startswith("enhance_MCSP_shared_class_head.")}
    )
    levels = range(config["num_feature_levels"])
    with torch.no_grad():
        output = encoder(
            [tensors[f"input.feat{i}"].float() for i in levels],
            [tensors[f"input.mask{i}"].bool() for i in levels],
            [tensors[f"input.pos{i}"].float() for i in levels],
            score_head=class_head,
        )
    expected = {k[len("f32."):]: v for k, v in tensors.items() if k.startswith("f32.")}
    return output, expected


def test_fixture_foreground_scores(encoder_fixture):
    output, expected = encoder_fixture
    torch.testing.assert_close(
        output.foreground_logits, expected["temp_backbone_mask_prediction"][..., 0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(output.focus_counts.long(), expected["focus_token_nums"].long())
    torch.testing.assert_close(output.valid_ratios, expected["valid_ratios"])
    reference_points = encoder_reference_points(output.spatial_shapes, output.valid_ratios)
    torch.testing.assert_close(reference_points, expected["encoder_reference_points"])


def test_fixture_cascade_indices(encoder_fixture):
    output, expected = encoder_fixture
    assert len(output.foreground_indices) == 6
    for layer, indices in enumerate(output.foreground_indices):
        assert torch.equal(indices, expected[f"foreground_inds_layer{layer}"].long()), f"layer {layer}"


def test_fixture_class_scores_and_self_attention_tokens(encoder_fixture):
    output, expected = encoder_fixture
    for layer, logits in enumerate(output.class_logits):
        torch.testing.assert_close(logits, expected[f"mcsp_logits_layer{layer}"], atol=1e-5, rtol=0)
        assert torch.equal(output.self_attn_indices[layer], expected[f"oesm_select_index_layer{layer}_derived"].long())


def test_fixture_encoder_output(encoder_fixture):
    output, expected = encoder_fixture
    torch.testing.assert_close(output.memory, expected["memory"], atol=2e-5, rtol=0)


class _RecordingLinearScorer(nn.Module):
    """Stand-in score network without the LayerNorm (which cancels the per-token modulation factor), recording the
    level sizes in call order."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.calls = []

    def forward(self, tokens):
        self.calls.append(tokens.shape[1])
        return self.linear(tokens).squeeze(-1)


def _naive_level_scores(selector, level_tokens, shapes):
    """Coarse-to-fine recursion written out level by level, as the paper describes it."""
    scores = {}
    for level in reversed(range(len(shapes))):
        tokens = level_tokens[level]
        if level + 1 in scores:
            h, w = shapes[level]
            coarser = scores[level + 1].view(tokens.shape[0], 1, *shapes[level + 1])
            up = nn.functional.interpolate(coarser, size=(h, w), mode="bilinear", align_corners=True)
            tokens = tokens * (1 + selector.alpha[len(shapes) - 2 - level] * up.flatten(1)[..., None])
        scores[level] = selector.scorer(tokens)
    return [scores[level] for level in range(len(shapes))]


@pytest.mark.parametrize("shapes", [[(5, 6)], [(6, 7), (3, 4)], [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)]])
@pytest.mark.parametrize("linear_scorer", [False, True])
def test_selector_modulation_any_number_of_levels(shapes, linear_scorer):
    torch.manual_seed(0)
    selector = ForegroundTokenSelector(dim=32, num_levels=len(shapes))
    if linear_scorer:
        selector.scorer = _RecordingLinearScorer(32)
    with torch.no_grad():
        selector.alpha.copy_(torch.linspace(-1.0, 2.0, len(shapes) - 1))
    level_tokens = [torch.randn(2, h * w, 32) for h, w in shapes]
    spatial_shapes = torch.tensor(shapes)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), spatial_shapes.prod(1).cumsum(0)[:-1]])
    scores = selector(torch.cat(level_tokens, 1), spatial_shapes, starts)
    torch.testing.assert_close(scores, torch.cat(_naive_level_scores(selector, level_tokens, shapes), 1))
    if linear_scorer:
        sizes = [h * w for h, w in shapes]
        assert selector.scorer.calls[: len(shapes)] == sizes[::-1]  # coarse to fine


def test_selector_modulation_flows_coarse_to_fine():
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    selector = ForegroundTokenSelector(dim=16, num_levels=3)
    selector.scorer = _RecordingLinearScorer(16)
    spatial_shapes = torch.tensor(shapes)
    starts = torch.tensor([0, 64, 80])
    tokens = torch.randn(1, 84, 16)
    base = selector(tokens, spatial_shapes, starts)

    finest_changed = tokens.clone()
    finest_changed[:, :64] += torch.randn(1, 64, 16)
    scores = selector(finest_changed, spatial_shapes, starts)
    torch.testing.assert_close(scores[:, 64:], base[:, 64:])  # coarser levels never see finer ones

    coarsest_changed = tokens.clone()
    coarsest_changed[:, 80:] += torch.randn(1, 4, 16)
    scores = selector(coarsest_changed, spatial_shapes, starts)
    assert (scores[:, :64] - base[:, :64]).abs().max() > 1e-4  # reaches the finest level through the middle one

    with torch.no_grad():
        selector.alpha.zero_()
    scores = selector(coarsest_changed, spatial_shapes, starts)
    torch.testing.assert_close(scores[:, :80], selector(tokens, spatial_shapes, starts)[:, :80])


def test_label_assignment_hand_made_boxes():
    # Two levels, strides 8 and 16 on a 64x64 image; token centres at 4, 12, ... and 8, 24, ...
    spatial_shapes = torch.tensor([[8, 8], [4, 4]])
    ranges = [(-1.0, 20.0), (20.0, float("inf"))]
    small = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # max side distance <= 12 -> level 0 only
    large = torch.tensor([[2.0, 2.0, 62.0, 62.0]])  # centre tokens far from sides -> level 1, edge tokens level 0
    labels = foreground_targets([small, large, torch.zeros(0, 4)], spatial_shapes, [8, 16], ranges)
    fine, coarse = labels[:, :64].view(3, 8, 8), labels[:, 64:].view(3, 4, 4)

    expected_fine = torch.zeros(8, 8)
    expected_fine[:2, :2] = 1  # centres (4, 4), (12, 4), (4, 12), (12, 12)
    assert torch.equal(fine[0], expected_fine) and coarse[0].sum() == 0

    # Level 0 of the large box: centres whose farthest side is <= 20, i.e. 42 <= x, y <= ... impossible inside
    # a 60-px box (max distance >= 30), so level 0 is empty; level 1 keeps every centre with max distance > 20.
    assert fine[1].sum() == 0
    centres = torch.arange(4) * 16 + 8.0
    far = torch.maximum(centres - 2, 62 - centres)
    expected_coarse = ((far[:, None] > 20) | (far[None, :] > 20)).float()
    assert torch.equal(coarse[1], expected_coarse)
    assert labels[2].sum() == 0  # image without objects


def test_level_size_ranges():
    assert level_size_ranges(4) == [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, float("inf"))]
    assert level_size_ranges(3, overlapping=True) == [(-1.0, 64.0), (32.0, 128.0), (64.0, float("inf"))]
    # With the overlapping ranges a token may be positive on two levels.
    box = [torch.tensor([[0.0, 0.0, 100.0, 100.0]])]
    spatial_shapes = torch.tensor([[32, 32], [16, 16]])
    contiguous = foreground_targets(box, spatial_shapes, [8, 16], level_size_ranges(2))
    overlapping = foreground_targets(box, spatial_shapes, [8, 16], level_size_ranges(2, overlapping=True))
    assert overlapping.sum() > contiguous.sum()


def test_selector_focal_loss_matches_release_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    targets = (torch.rand(2, 50) > 0.8).float()
    targets[1] = 0
    p = logits.sigmoid()
    pt = p * targets + (1 - p) * (1 - targets)
    weight = 0.25 * targets + 0.75 * (1 - targets)
    per_image = (-weight * (1 - pt) ** 2 * pt.log()).sum(-1) / targets.sum(-1).clamp(min=1)
    torch.testing.assert_close(selector_focal_loss(logits, targets), per_image.mean())


def test_cascade_sizes_and_padding_ranked_last():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    indices, masked, counts = cascade_token_indices(scores, padding, 0.5, (1.0, 0.5))
    assert counts.tolist() == [3, 4]  # int(0.5 * valid) + 1
    assert [i.shape[1] for i in indices] == [4, 2]
    assert indices[0][0].tolist() == [0, 1, 2, 3]  # the high-scoring padding token is not ranked first
    assert masked[0, 5] == scores.min()


def _random_encoder_inputs(shapes, batch=2, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, dim, h, w, generator=generator) for h, w in shapes]
    pos = [torch.randn(batch, dim, h, w, generator=generator) for h, w in shapes]
    masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in shapes]
    for mask in masks:
        mask[1, :, mask.shape[2] // 2 + 1:] = True
    return features, masks, pos


def test_encoder_small_input_keeps_fewer_tokens_and_leaves_background():
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 3), (1, 2)]
    encoder = FocusEncoder(d_model=32, n_heads=4, num_layers=3, ffn_dim=16, n_levels=3, topk_sa=300).eval()
    features, masks, pos = _random_encoder_inputs(shapes)
    output = encoder(features, masks, pos, score_head=nn.Linear(32, 3))
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
    updated = torch.zeros(src.shape[:2], dtype=torch.bool)
    for indices in output.foreground_indices[:3]:
        for b in range(2):
            updated[b, indices[b, : output.focus_counts[b]]] = True
    assert updated.any() and not updated.all()
    torch.testing.assert_close(output.memory[~updated], src[~updated])  # background tokens untouched
    assert (output.memory[updated] - src[updated]).abs().amax(-1).min() > 0
    assert all(i.shape[1] <= 300 for i in output.self_attn_indices)


def test_encoder_trains_selector_through_the_class_score():
    torch.manual_seed(0)
    encoder = FocusEncoder(d_model=32, n_heads=4, num_layers=2, ffn_dim=16, n_levels=2, topk_sa=4)
    features, masks, pos = _random_encoder_inputs([(6, 7), (3, 4)])
    head = nn.Linear(32, 3)
    output = encoder(features, masks, pos, score_head=head)
    targets = foreground_targets(
        [torch.tensor([[8.0, 8.0, 40.0, 30.0]]), torch.zeros(0, 4)], output.spatial_shapes, [8, 16],
    )
    loss = output.memory.square().mean() + selector_focal_loss(output.foreground_logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert encoder.selector.scorer.head[-1].weight.grad.abs().sum() > 0
    assert encoder.layers[0].cross_attn.value_proj.weight.grad.abs().sum() > 0


def test_encoder_layer_inference_ffn_in_token_chunks_matches_plain_layer(monkeypatch):
    torch.manual_seed(0)
    layer = DualAttentionEncoderLayer(d_model=32, n_heads=4, ffn_dim=64, n_levels=2, topk_sa=8).eval()
    shapes = torch.tensor([[6, 7], [3, 4]])
    value, query, pos = torch.randn(2, 54, 32), torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    args = (query, pos, torch.rand(2, 40, 2, 2), torch.randn(2, 40), value, shapes, torch.tensor([0, 42]))
    mask = torch.zeros(2, 54, dtype=torch.bool)
    mask[1, 30:42] = True
    passes = []
    layer.linear1.register_forward_hook(lambda module, inputs, out: passes.append(inputs[0].shape[0]))
    query_before = query.clone()
    with torch.no_grad():
        expected, expected_selected = layer(*args, mask)
        monkeypatch.setattr(utils, "FFN_CHUNK_BYTES", 64 * 4 * 16)  # 16 tokens: 5 chunks over the 80 of the batch
        out, selected = layer(*args, mask)
    assert passes == [2, 16, 16, 16, 16, 16]
    torch.testing.assert_close(out, expected)
    assert torch.equal(selected, expected_selected)
    assert torch.equal(query, query_before)


def test_encoder_rejects_bad_config():
    with pytest.raises(ValueError, match="cascade"):
        FocusEncoder(d_model=32, n_heads=4, num_layers=7)
    with pytest.raises(ValueError, match="keep_ratio"):
        FocusEncoder(d_model=32, n_heads=4, keep_ratio=0.0)


def _detectron2_resnet50_keys(model):
    """detectron2 names for every tensor of a torchvision-style ResNet-50, with the timm tensor to fill it."""
    timm_state = model.state_dict()
    pairs = {"stem.conv1.weight": timm_state["conv1.weight"]}
    for name in ("weight", "bias", "running_mean", "running_var"):
        pairs[f"stem.conv1.norm.{name}"] = timm_state[f"bn1.{name}"]
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for block in range(blocks):
            timm_prefix = f"layer{stage - 1}.{block}"
            convs = [(f"conv{j}", f"conv{j}", f"bn{j}") for j in (1, 2, 3)]
            if block == 0:
                convs.append(("shortcut", "downsample.0", "downsample.1"))
            for d2_name, conv, norm in convs:
                pairs[f"res{stage}.{block}.{d2_name}.weight"] = timm_state[f"{timm_prefix}.{conv}.weight"]
                for name in ("weight", "bias", "running_mean", "running_var"):
                    pairs[f"res{stage}.{block}.{d2_name}.norm.{name}"] = timm_state[f"{timm_prefix}.{norm}.{name}"]
    return {"backbone." + k: torch.randn_like(v) if v.is_floating_point() else v for k, v in pairs.items()}


def test_detectron2_resnet50_onto_timm_features_only():
    model = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    official = _detectron2_resnet50_keys(model)
    official["transformer.level_embeds"] = torch.zeros(4, 256)  # other parts of the checkpoint are ignored
    converted = convert_detectron2_resnet_state_dict(official, model=model)
    model.load_state_dict(converted)
    torch.testing.assert_close(model.layer3[5].bn2.running_var, official["backbone.res4.5.conv2.norm.running_var"])
    torch.testing.assert_close(model.layer2[0].downsample[0].weight, official["backbone.res3.0.shortcut.weight"])
    del official["backbone.res5.2.conv3.norm.bias"]
    with pytest.raises(ValueError, match="layer4.2.bn3.bias"):
        convert_detectron2_resnet_state_dict(official, model=model)
