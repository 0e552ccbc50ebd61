"""Focus-DETR's DINO base: denoising queries and masks, query selection, look-forward-twice decoder."""
import pytest
import torch
from torch import nn

from dat_smt.adapters import MLP, inverse_sigmoid
from dat_smt.adapters.focus_detr_dino import (
    ContrastiveDenoising,
    DinoDecoder,
    denoising_attention_mask,
    denoising_match_indices,
    look_forward_twice_boxes,
    select_queries,
    sine_box_embedding,
)


@pytest.mark.parametrize("num_groups,group_size,num_queries", [(1, 2, 3), (3, 4, 5), (5, 2, 0)])
def test_denoising_mask_brute_force(num_groups, group_size, num_queries):
    mask = denoising_attention_mask(num_groups, group_size, num_queries)
    pad = num_groups * group_size
    for i in range(pad + num_queries):
        for j in range(pad + num_queries):
            if i >= pad:  # matching query: sees matching queries only
                blocked = j < pad
            elif j >= pad:  # denoising query sees all matching queries
                blocked = False
            else:  # denoising queries see their own group only
                blocked = i // group_size != j // group_size
            assert mask[i, j].item() == blocked, (i, j)


def _targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.1]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


def test_denoising_queries_layout_and_noise():
    torch.manual_seed(0)
    denoising = ContrastiveDenoising(num_classes=4, d_model=8, dn_number=5, label_noise_ratio=0.0)
    queries = denoising(_targets(), num_queries=6)
    assert (queries.num_groups, queries.group_size) == (2, 4)  # 5 * 2 // (2 * 2 objects)
    assert queries.content.shape == (3, 8, 8) and queries.attn_mask.shape == (14, 14)
    targets = _targets()
    for image, target in enumerate(targets):
        for group in range(queries.num_groups):
            for slot in range(2):
                for negative in (0, 1):
                    row = group * 4 + negative * 2 + slot
                    if slot >= len(target["labels"]):
                        assert queries.content[image, row].abs().sum() == 0
                        continue
                    label = target["labels"][slot]
                    torch.testing.assert_close(queries.content[image, row], denoising.label_embed.weight[label])
                    truth = target["boxes"][slot]
                    noised = queries.boxes_unact[image, row].sigmoid()
                    truth_xyxy = torch.cat([truth[:2] - truth[2:] / 2, truth[:2] + truth[2:] / 2])
                    noised_xyxy = torch.cat([noised[:2] - noised[2:] / 2, noised[:2] + noised[2:] / 2])
                    shift = (noised_xyxy - truth_xyxy).abs() / truth[2:].repeat(2) * 2  # in half box sizes
                    if negative:
                        # Corners moved past each other collapse to zero size (as in DINO); skip those.
                        if (noised[2:] > 1e-3).all():
                            assert (shift >= 1 - 1e-4).all()
                    else:
                        assert (shift <= 1 + 1e-4).all()


def test_denoising_none_without_objects_and_label_noise():
    denoising = ContrastiveDenoising(num_classes=4, d_model=8)
    assert denoising([_targets()[2]], num_queries=3) is None
    torch.manual_seed(0)
    noisy = ContrastiveDenoising(num_classes=50, d_model=8, dn_number=100, label_noise_ratio=1.0, box_noise_scale=0)
    queries = noisy([_targets()[1]], num_queries=3)
    rows = queries.content[0, 0::2]  # group size 2: positive then negative
    same = (rows == noisy.label_embed.weight[0]).all(-1).float().mean()
    assert 0.3 < same < 0.7  # half of the labels are redrawn (from 50 classes)
    torch.testing.assert_close(queries.boxes_unact[0, 0], inverse_sigmoid(_targets()[1]["boxes"][0]))


def test_denoising_match_indices():
    indices = denoising_match_indices([2, 1, 0], num_groups=2, group_size=4)
    assert indices[0][0].tolist() == [0, 1, 4, 5] and indices[0][1].tolist() == [0, 1, 0, 1]
    assert indices[1][0].tolist() == [0, 4] and indices[2][0].numel() == 0


def _decoder_inputs(batch=2, dim=32, shapes=((6, 7), (3, 4))):
    torch.manual_seed(0)
    spatial_shapes = torch.tensor(shapes)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), spatial_shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(spatial_shapes.prod(1).sum())
    memory = torch.randn(batch, tokens, dim)
    padding = torch.zeros(batch, tokens, dtype=torch.bool)
    ratios = torch.ones(batch, len(shapes), 2)
    return memory, padding, spatial_shapes, starts, ratios


def test_denoising_mask_isolates_groups_in_the_decoder():
    dim, queries = 32, 5
    decoder = DinoDecoder(d_model=32, n_heads=4, num_layers=2, ffn_dim=16, n_levels=2).eval()
    heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(2))
    memory, padding, shapes, starts, ratios = _decoder_inputs()
    denoising = ContrastiveDenoising(num_classes=4, d_model=dim, dn_number=4)
    dn = denoising(_targets()[:2], num_queries=queries)
    tgt = torch.cat([dn.content, torch.randn(2, queries, dim)], 1)
    boxes = torch.cat([dn.boxes_unact.sigmoid(), torch.rand(2, queries, 4) * 0.5 + 0.25], 1)
    run = lambda t: decoder(t, boxes, memory, padding, shapes, starts, ratios, heads, dn.attn_mask)[0]  # noqa: E731
    base = run(tgt)
    pad = dn.num_groups * dn.group_size
    changed = tgt.clone()
    changed[:, : dn.group_size] += torch.randn(2, dn.group_size, dim)  # perturb denoising group 0 only
    out = run(changed)
    torch.testing.assert_close(out[:, :, pad:], base[:, :, pad:])  # matching queries see no denoising query
    torch.testing.assert_close(out[:, :, dn.group_size:pad], base[:, :, dn.group_size:pad])  # nor other groups
    assert (out[:, :, : dn.group_size] - base[:, :, : dn.group_size]).abs().max() > 1e-4
    changed = tgt.clone()
    changed[:, pad:] += 1.0
    assert (run(changed)[:, :, :pad] - base[:, :, :pad]).abs().max() > 1e-4  # denoising queries see matching ones


def test_look_forward_twice_trains_the_previous_layer():
    dim = 32
    decoder = DinoDecoder(d_model=dim, n_heads=4, num_layers=3, ffn_dim=16, n_levels=2)
    heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(3))
    memory, padding, shapes, starts, ratios = _decoder_inputs()
    initial = torch.rand(2, 4, 4) * 0.5 + 0.25
    hidden, refined = decoder(torch.randn(2, 4, dim), initial, memory, padding, shapes, starts, ratios, heads)
    assert hidden.shape == (3, 2, 4, dim) and refined.shape == (3, 2, 4, 4)
    predictions = look_forward_twice_boxes(hidden, initial, refined, heads)
    predictions[2].sum().backward()
    assert heads[1].layers[0].weight.grad.abs().sum() > 0  # through layer 1's undetached boxes
    grad = heads[0].layers[0].weight.grad
    assert grad is None or grad.abs().sum() == 0  # references between layers are detached


def test_sine_box_embedding_and_query_selection():
    boxes = torch.tensor([[0.25, 0.5, 0.1, 0.2]])
    embed = sine_box_embedding(boxes, num_feats=8)
    assert embed.shape == (1, 32)
    torch.testing.assert_close(embed[0, 0], torch.sin(torch.tensor(0.5 * 2 * torch.pi)))  # y first
    torch.testing.assert_close(embed[0, 8], torch.sin(torch.tensor(0.25 * 2 * torch.pi)))
    logits = torch.tensor([[[0.0, 1.0], [5.0, -9.0], [2.0, 2.5]]])
    coords = torch.arange(12.0).view(1, 3, 4)
    indices, selected = select_queries(logits, coords, num_queries=900)  # fewer tokens than queries: no crash
    assert indices.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(selected, coords[:, [1, 2, 0]])
