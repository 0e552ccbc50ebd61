"""Shared by the benchmarks of the extension's CPU kernels against the PyTorch formulations they replace."""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from dat_smt.ops._extension import load_extension


def parse_args(description: str, repeats: int) -> argparse.Namespace:
    """The benchmark's ``--threads`` and ``--repeats``; sets the thread count, and exits with the reason when the
    extension's CPU kernels are unavailable."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    status = load_extension()
    if not status["cpu"]:
        raise SystemExit(f"the extension's CPU kernels are unavailable: {status['reason']}")
    torch.set_num_threads(args.threads)
    return args


def median_times(functions: Dict[str, Callable[..., torch.Tensor]], args: tuple, repeats: int) -> Dict[str, float]:
    """Median seconds per call of each function on ``args``: one warm-up call each, then the functions alternate, so
    that the machine's drifts in speed fall on all of them alike."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for function in functions.values():
        function(*args)
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function(*args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
