"""Benchmark of LayerNorm over channels: the extension's CPU kernel against ``F.layer_norm`` (the formulation it
replaces), measured in one process.

Maps are those of dat_pp_tiny at 224x224, batch 8, as the (B, H, W, C) memory of channels-last maps (smt_tiny's token
rows have the same shapes from the first stage on): the stem's first norm, the stage norms of stages 1-4, and the
offset network's norm of the third stage. float32, ``torch.inference_mode``. Each case alternates the two
implementations; the median of the repeats is reported. Prints a table, then (last) one JSON line with the times
and the ratio torch / kernel per case.

    python benchmarks/layer_norm.py [--threads 2] [--repeats 30]
"""
import json
from typing import List, Tuple

import torch
import torch.nn.functional as F
from _kernel_bench import median_times, parse_args

from dat_smt.ops.norm import layer_norm

# (B, H, W, C)
CASES: List[Tuple[int, int, int, int]] = [
    (8, 112, 112, 32), (8, 56, 56, 64), (8, 28, 28, 128), (8, 14, 14, 256), (8, 7, 7, 512), (32, 7, 7, 64),
]


def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def main() -> None:
    args = parse_args(__doc__, repeats=30)
    results = []
    print(f"{'map (B, H, W, C)':<20} {'kernel ms':>10} {'torch ms':>9} {'torch/kernel':>13}")
    with torch.inference_mode():
        for shape in CASES:
            x = torch.randn(shape)
            weight, bias = torch.randn(shape[-1]), torch.randn(shape[-1])
            times = median_times({"kernel": layer_norm, "torch": torch_layer_norm}, (x, weight, bias, 1e-5),
                                 args.repeats)
            ratio = times["torch"] / times["kernel"]
            print(f"{str(shape):<20} {times['kernel'] * 1e3:>10.3f} {times['torch'] * 1e3:>9.3f} {ratio:>12.2f}x")
            results.append({"shape": list(shape), "kernel_ms": times["kernel"] * 1e3, "torch_ms": times["torch"] * 1e3,
                            "ratio": ratio})
    print(json.dumps({"threads": args.threads, "cases": results}))


if __name__ == "__main__":
    main()
