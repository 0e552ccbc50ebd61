"""Benchmark of multi-scale deformable attention: the ``cpp`` extension against the ``reference`` backend.

Sizes of Deformable DETR at an 800x1333 input: levels 100x167, 50x84, 25x42, 13x21 (S = 22 223), N = 1, M = 8
heads, D = 32 channels, P = 4 points, float32.
- encoder: every one of the S tokens is a query; its reference point is its own centre (in every level) and its
  sampling offsets are the module's ring initialisation plus unit Gaussian noise, in level pixels.
- decoder: 300 queries with uniformly random reference points and the same offsets.
Attention weights are a softmax over the L * P samples of each (query, head).

Times are medians over repeats after one warm-up call. Memory is the peak resident-set growth of the process
during one forward call, read from Linux ``/proc/self/status`` (VmHWM after resetting it through
``/proc/self/clear_refs``), after all timings: glibc is then told to serve every allocation above 64 KiB with mmap
(fixed threshold) and to return its free heap pages (malloc_trim) before each measurement, so the growth counts the
memory the call really touches. The machine may be shared, so absolute times are noisy; the ratios are measured in
one process.

    python benchmarks/msda.py [--threads 2] [--repeats 5]
"""
import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from dat_smt.ops import multi_scale_deformable_attention

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
HEADS, CHANNELS, POINTS, DECODER_QUERIES = 8, 32, 4, 300


def ring_offsets(num_queries: int, generator: torch.Generator) -> torch.Tensor:
    """(1, Lq, M, L, P, 2) offsets in level pixels: the MSDeformAttn ring initialisation plus N(0, 1) noise."""
    thetas = torch.arange(HEADS, dtype=torch.float32) * (2.0 * math.pi / HEADS)
    ring = torch.stack([thetas.cos(), thetas.sin()], -1)
    ring = ring / ring.abs().max(-1, keepdim=True)[0]
    ring = ring.view(1, 1, HEADS, 1, 1, 2) * torch.arange(1, POINTS + 1, dtype=torch.float32).view(1, 1, 1, 1, -1, 1)
    noise = torch.randn(1, num_queries, HEADS, len(LEVELS), POINTS, 2, generator=generator)
    return ring + noise


def make_inputs(num_queries: int | None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs of the encoder (``num_queries=None``: every token is a query) or of the decoder."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if num_queries is None:
        centres = []
        for height, width in LEVELS:
            y, x = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        reference = torch.cat(centres)[None, :, None, :].expand(1, -1, len(LEVELS), 2)
    else:
        reference = torch.rand(1, num_queries, 1, 2, generator=generator).expand(1, -1, len(LEVELS), 2)
    lq = reference.shape[1]
    normaliser = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()
    locations = reference[:, :, None, :, None, :] + ring_offsets(lq, generator) / normaliser[None, None, None, :, None]
    logits = torch.randn(1, lq, HEADS, len(LEVELS) * POINTS, generator=generator)
    return {
        "value": torch.randn(1, int(sizes.sum()), HEADS, CHANNELS, generator=generator),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": locations.contiguous(),
        "attention_weights": logits.softmax(-1).view(1, lq, HEADS, len(LEVELS), POINTS),
    }


def median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_growth_mib(fn: Callable[[], None]) -> float | None:
    """Peak resident-set growth during ``fn`` in MiB, or None where /proc cannot report it."""
    status = Path("/proc/self/status")
    try:
        gc.collect()
        release_free_heap_pages()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib(status, "VmRSS")
        fn()
        return (_status_kib(status, "VmHWM") - before) / 1024
    except OSError:
        return None


def _status_kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} missing from {status}")


def forward_call(inputs: Dict[str, torch.Tensor], backend: str) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            multi_scale_deformable_attention(**inputs, backend=backend)

    return forward


def measure_times(inputs: Dict[str, torch.Tensor], backend: str, repeats: int) -> Dict[str, float | None]:
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    grad_output = torch.randn(1, inputs["sampling_locations"].shape[1], HEADS * CHANNELS)

    def forward_backward() -> None:
        output = multi_scale_deformable_attention(**leaves, backend=backend)
        output.backward(grad_output)
        for tensor in leaves.values():
            tensor.grad = None

    return {
        "fwd_s": median_time(forward_call(inputs, backend), repeats),
        "fwdbwd_s": median_time(forward_backward, repeats),
    }


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def serve_large_allocations_with_mmap() -> None:
    """Fixes glibc's mmap threshold (64 KiB) so freed tensors are unmapped instead of kept in the heap."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)


def release_free_heap_pages() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = {"encoder": make_inputs(None), "decoder": make_inputs(DECODER_QUERIES)}
    backends = ("cpp", "reference")
    # Times first, with the default allocator; then memory, with every large allocation served by mmap.
    all_results = {
        case: {backend: measure_times(inputs, backend, args.repeats) for backend in backends}
        for case, inputs in cases.items()
    }
    serve_large_allocations_with_mmap()
    for case, inputs in cases.items():
        for backend in backends:
            all_results[case][backend]["fwd_peak_mib"] = peak_rss_growth_mib(forward_call(inputs, backend))

    summary: Dict[str, float] = {}
    print(f"{'case':<8} {'backend':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd peak MiB':>13}")
    for case, results in all_results.items():
        for backend, result in results.items():
            peak = result["fwd_peak_mib"]
            print(
                f"{case:<8} {backend:<10} {result['fwd_s'] * 1e3:>9.1f} {result['fwdbwd_s'] * 1e3:>11.1f} "
                f"{'n/a' if peak is None else f'{peak:.1f}':>13}"
            )
        summary[f"{case}_fwd_speedup"] = round(results["reference"]["fwd_s"] / results["cpp"]["fwd_s"], 2)
        summary[f"{case}_fwdbwd_speedup"] = round(results["reference"]["fwdbwd_s"] / results["cpp"]["fwdbwd_s"], 2)
        for backend in ("cpp", "reference"):
            for key in ("fwd_s", "fwdbwd_s", "fwd_peak_mib"):
                value = results[backend][key]
                summary[f"{case}_{backend}_{key}"] = None if value is None else round(value, 4)
    summary["threads"] = args.threads
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
