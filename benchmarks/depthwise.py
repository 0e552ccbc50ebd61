"""Benchmark of the depthwise 3x3 conv (with fused GELU where the networks apply one): the extension's CPU kernel
against PyTorch's conv followed by its in-place GELU over the map's dense memory (the formulation it replaces),
measured in one process.

Maps are those of dat_pp_tiny and smt_tiny at 224x224, batch 8 (the first stage's MLP runs on half batches),
channels-last float32, ``torch.inference_mode``: the MLP convs (with GELU) and DAT++'s local perception units
(without). Each case alternates the two implementations; the median of the repeats is reported.
Prints a table, then (last) one JSON line with the times and the ratio torch / kernel per case.

    python benchmarks/depthwise.py [--threads 2] [--repeats 20]
"""
import json
from typing import List, Tuple

import torch
import torch.nn.functional as F
from _kernel_bench import median_times, parse_args

from dat_smt._layers import gelu_
from dat_smt.ops import depthwise_conv2d

# (batch, channels, size, gelu)
CASES: List[Tuple[int, int, int, bool]] = [
    (4, 256, 56, True), (8, 512, 28, True), (8, 1024, 14, True), (8, 2048, 7, True), (8, 1024, 7, True),
    (8, 64, 56, False), (8, 128, 28, False), (8, 256, 14, False), (8, 512, 7, False),
]


def torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
    return gelu_(out) if gelu else out


def main() -> None:
    args = parse_args(__doc__, repeats=20)
    results = []
    print(f"{'map (B, C, H=W)':<20} {'gelu':<6} {'kernel ms':>10} {'torch ms':>9} {'torch/kernel':>13}")
    with torch.inference_mode():
        for batch, channels, size, gelu in CASES:
            x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
            weight, bias = torch.randn(channels, 1, 3, 3), torch.randn(channels)
            times = median_times({"kernel": depthwise_conv2d, "torch": torch_conv}, (x, weight, bias, gelu),
                                 args.repeats)
            ratio = times["torch"] / times["kernel"]
            shape = f"({batch}, {channels}, {size})"
            print(f"{shape:<20} {str(gelu):<6} {times['kernel'] * 1e3:>10.2f} {times['torch'] * 1e3:>9.2f} "
                  f"{ratio:>12.2f}x")
            results.append({"batch": batch, "channels": channels, "size": size, "gelu": gelu,
                            "kernel_ms": times["kernel"] * 1e3, "torch_ms": times["torch"] * 1e3, "ratio": ratio})
    print(json.dumps({"threads": args.threads, "cases": results}))


if __name__ == "__main__":
    main()
