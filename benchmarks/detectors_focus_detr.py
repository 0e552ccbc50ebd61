"""Focus-DETR: encoder FLOPs and CPU inference time with token selection versus keep ratio 1.0 (no selection).

Both models share weights, backbone (resnet50) and input (batch 1, 800x1216) in one process. Encoder FLOPs are
counted with ``torch.utils.flop_counter.FlopCounterMode`` (linear layers, attention, ...) plus the multi-scale
deformable attention sampling counted analytically (the C++ op is opaque to the counter): 10 FLOPs per
(query, channel, level, point) = 4 bilinear corner multiply-adds + 1 attention-weight multiply-add.

Usage: ``python benchmarks/detectors_focus_detr.py [--height 800 --width 1216 --runs 2 --threads 2]``.
The last line printed is a JSON object with both measurements and their ratios.
"""
import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dat_smt.adapters import create_detector
from dat_smt.ops import MSDeformAttn


def msda_sampling_flops(module: MSDeformAttn, num_queries: int) -> int:
    """Analytic FLOPs of one deformable-attention sampling step (not seen by the FLOP counter)."""
    return 10 * num_queries * module.d_model * module.n_levels * module.n_points


def encoder_flops(model, images: torch.Tensor, mask: torch.Tensor) -> dict:
    """FLOPs of the Focus-DETR encoder side (selector + sparse layers) for one forward."""
    srcs, masks, pos = model.forward_features(images, mask)
    analytic = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: analytic.append(msda_sampling_flops(mod, args[0].shape[1])))
        for m in model.encoder.modules() if isinstance(m, MSDeformAttn)
    ]
    counter = FlopCounterMode(display=False)
    with counter:
        model.encoder(srcs, masks, pos, score_head=model.class_embed[-1])
    for hook in hooks:
        hook.remove()
    counted = counter.get_total_flops()
    return {"counted": counted, "msda_analytic": sum(analytic), "total": counted + sum(analytic)}


def time_inference(model, images: list, runs: int) -> float:
    """Median seconds of ``model(images)`` in eval mode after one warm-up."""
    times = []
    with torch.no_grad():
        model(images)
        for _ in range(runs):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    focus = create_detector("focus_detr", backbone=args.backbone, num_classes=80).eval()
    dense = create_detector("focus_detr", backbone=args.backbone, num_classes=80, keep_ratio=1.0,
                            cascade=[1.0] * 6).eval()
    dense.load_state_dict(focus.state_dict())
    image = torch.rand(3, args.height, args.width)
    batch = ((image[None] - focus.image_mean) / focus.image_std)
    mask = torch.zeros(1, args.height, args.width, dtype=torch.bool)

    with torch.no_grad():
        flops = {name: encoder_flops(model, batch, mask) for name, model in (("focus", focus), ("dense", dense))}
    seconds = {name: time_inference(model, [image], args.runs) for name, model in (("focus", focus), ("dense", dense))}

    print(f"Focus-DETR ({args.backbone}, {args.height}x{args.width}, batch 1, {args.threads} threads)")
    print(f"{'model':<28}{'encoder GFLOPs':>16}{'(MSDA analytic)':>17}{'inference s':>13}")
    for name, label in (("focus", "keep ratio 0.5 (default)"), ("dense", "keep ratio 1.0 (no selection)")):
        print(f"{label:<28}{flops[name]['total'] / 1e9:>16.1f}{flops[name]['msda_analytic'] / 1e9:>17.1f}"
              f"{seconds[name]:>13.2f}")
    result = {
        "benchmark": "focus_detr_token_selection",
        "backbone": args.backbone,
        "size": [args.height, args.width],
        "threads": args.threads,
        "encoder_gflops_focus": flops["focus"]["total"] / 1e9,
        "encoder_gflops_dense": flops["dense"]["total"] / 1e9,
        "encoder_flops_ratio": flops["focus"]["total"] / flops["dense"]["total"],
        "inference_s_focus": seconds["focus"],
        "inference_s_dense": seconds["dense"],
        "inference_time_ratio": seconds["focus"] / seconds["dense"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
