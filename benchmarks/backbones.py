"""CPU throughput of the dat-smt backbones against timm baselines of similar cost, measured in one process.

224x224, batch 8, 2 threads, ``torch.inference_mode``, channels-last weights and input for every model;
warm-up, then forwards of all models interleaved, median.
Prints a table, then (last) one JSON line with images/s per model and the ratio model / baseline per pair.
"""
import argparse
import json
import statistics
import time
from typing import Dict, List, Tuple

import timm
import torch

import dat_smt  # noqa: F401  (registers the models)

PAIRS: List[Tuple[str, str]] = [
    ("dat_tiny", "swin_tiny_patch4_window7_224"),
    ("dat_pp_tiny", "swin_tiny_patch4_window7_224"),
    ("smt_tiny", "pvt_v2_b1"),
]


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW-contiguous weights and input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(name for pair in PAIRS for name in pair))
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    models = {name: timm.create_model(name).eval().to(memory_format=memory_format) for name in names}
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=memory_format)
    times: Dict[str, List[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name in names:
                models[name](x)
        for _ in range(args.runs):
            for name in names:
                times[name].append(_time_once(models[name], x))
    speed = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(f"{'model':<32} {'img/s':>8} {'median s/batch':>15}")
    for name in names:
        print(f"{name:<32} {speed[name]:>8.2f} {statistics.median(times[name]):>15.3f}")
    ratios = {f"{model}/{baseline}": speed[model] / speed[baseline] for model, baseline in PAIRS}
    for pair, ratio in ratios.items():
        print(f"{pair:<48} {ratio:>6.2f}x")
    print(json.dumps({"images_per_s": speed, "ratios": ratios, "batch": args.batch, "size": args.size,
                      "threads": args.threads, "channels_last": not args.no_channels_last}))


if __name__ == "__main__":
    main()
