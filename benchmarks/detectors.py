"""End-to-end CPU timing of the DETR-family detectors: the MSDA ``cpp`` backend against the ``reference`` one.

Every case builds one detector (random weights, official sizes) and times, in this process, batch-1 inference
and one training step (forward, backward, AdamW step) with every ``MSDeformAttn`` set to ``cpp`` and to the
pure PyTorch ``reference``, alternating the backends within each repeat (models without MSDA, e.g. SMCA, are
timed once). Cases with a ``baseline`` also get ``<mode>_vs_baseline`` ratios against that case (Deformable
DETR on the same backbone). Prints a table, then LAST one JSON line with the times and the ratios.

    python benchmarks/detectors.py                       # Deformable DETR (multi-scale, refine), 800 x 1216
    python benchmarks/detectors.py --size 512 768 --no-train
    python benchmarks/detectors.py --keep-freed-memory   # glibc keeps freed memory for reuse (see below)

On a VM where the host reclaims freed guest pages, every large fresh allocation page-faults (measured here: about
1 ms per MB, roughly 7x the cost of writing the memory), and glibc hands every block over 32 MB back to the
kernel; ``--keep-freed-memory`` makes glibc serve all blocks from its heap and never trim it, which speeds up
both backends alike by the same absolute amount (the same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``).

Add a detector by appending to ``CASES`` (name, ``create_detector`` arguments).
"""
import argparse
import ctypes
import ctypes.util
import json
import statistics
import time
from typing import Any, Dict, List

import torch

from dat_smt.adapters import create_detector
from dat_smt.ops import msda

CASES: List[Dict[str, Any]] = [
    {
        "case": "deformable_detr_ms_refine_r50",
        "detector": "deformable_detr",
        "options": dict(
            backbone="resnet50", num_classes=91, num_feature_levels=4, with_box_refine=True,
            backbone_kwargs=dict(channels_last=True),
        ),
    },
    {
        # no MSDA inside: timed once (first backend's column); ratios are against the baseline case's fastest
        # backend, measured in this process
        "case": "smca_single_scale_r50",
        "detector": "smca",
        "options": dict(backbone="resnet50", num_classes=91, num_queries=300, dynamic_scale="type3"),
        "baseline": "deformable_detr_ms_refine_r50",
    },
    {
        # the paper's multi-scale SMCA: 2-1-2 intra-/multi-scale self-attention encoder on strides 8-64
        "case": "smca_multi_scale_r50",
        "detector": "smca",
        "options": dict(backbone="resnet50", num_classes=91, num_queries=300, dynamic_scale="type3",
                        multi_scale=True, ms_encoder="attention"),
        "baseline": "deformable_detr_ms_refine_r50",
    },
    {
        # the released multi-scale SMCA encoder (depthwise convolutions)
        "case": "smca_multi_scale_dwconv_r50",
        "detector": "smca",
        "options": dict(backbone="resnet50", num_classes=91, num_queries=300, dynamic_scale="type3",
                        multi_scale=True, ms_encoder="dwconv"),
        "baseline": "deformable_detr_ms_refine_r50",
    },
    {
        # Token selection vs keep ratio 1.0 (encoder FLOPs, wall clock): benchmarks/detectors_focus_detr.py.
        "case": "focus_detr_r50",
        "detector": "focus_detr",
        "options": dict(backbone="resnet50", num_classes=80),
    },
]


def add_baseline_ratios(rows: List[Dict[str, Any]], cases: List[Dict[str, Any]], backends: List[str]) -> None:
    """Adds ``<mode>_vs_baseline`` = this case's time / the baseline case's time (both on their fastest backend)."""
    by_name = {row["case"]: row for row in rows}
    for case in cases:
        baseline = by_name.get(case.get("baseline", ""))
        if baseline is None:
            continue
        row = by_name[case["case"]]
        for mode in ("infer", "train_step"):
            if f"{mode}_{backends[0]}_s" in row:
                best = min(row[k] for k in (f"{mode}_{b}_s" for b in backends) if k in row)
                best_baseline = min(baseline[k] for k in (f"{mode}_{b}_s" for b in backends) if k in baseline)
                row[f"{mode}_vs_baseline"] = best / best_baseline


def cpp_backend_unavailable_reason() -> str | None:
    """None when the compiled CPU MSDA kernel can run here, else why not."""
    status = getattr(msda, "extension_status", None)
    if status is None:
        return "this build of dat_smt.ops has no compiled MSDA extension (only the reference backend)"
    try:
        if status("cpu"):
            return None
        return str(msda.load_extension().get("reason", "the extension has no CPU kernels"))
    except Exception as e:  # a failed JIT build is reported, not fatal
        return f"{type(e).__name__}: {e}"


def keep_freed_memory() -> bool:
    """Tells glibc malloc to serve every block from its heap (no mmap) and never return freed memory to the
    kernel; False where that is not possible (not glibc)."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1)) and bool(libc.mallopt(m_mmap_max, 0))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(case: Dict[str, Any], size, backends, repeats: int, warmup: int, train: bool) -> Dict[str, Any]:
    """Median times of inference and of one training step per backend; backends alternate within every repeat
    so that load from other processes on a shared machine hits all of them alike."""
    torch.manual_seed(0)
    model = create_detector(case["detector"], **case["options"])
    image = [torch.rand(3, *size)]
    target = [{"boxes": torch.tensor([[100.0, 120.0, 400.0, 500.0]]), "labels": torch.tensor([1])}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    @torch.no_grad()
    def infer():
        model.eval()(image)

    def train_step():
        loss = sum(model.train()(image, target).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    modes = {"infer": infer, **({"train_step": train_step} if train else {})}
    uses_msda = any(hasattr(m, "backend") and hasattr(m, "sampling_offsets") for m in model.modules())
    if not uses_msda:  # both backends would time the same model: time it once, under the first backend's name
        backends = backends[:1]
    times: Dict[str, List[float]] = {f"{m}_{b}_s": [] for m in modes for b in backends}
    for i in range(warmup + repeats):
        for mode, fn in modes.items():
            for backend in backends:
                model.set_msda_backend(backend)
                elapsed = _timed(fn)
                if i >= warmup:
                    times[f"{mode}_{backend}_s"].append(elapsed)
    row: Dict[str, Any] = {"case": case["case"], "size": list(size), "uses_msda": uses_msda}
    row.update({k: statistics.median(v) for k, v in times.items()})
    if "cpp" in backends and "reference" in backends:
        for mode in modes:
            row[f"{mode}_speedup"] = row[f"{mode}_reference_s"] / row[f"{mode}_cpp_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc: no mmap, no trimming (freed memory is reused without page faults)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    reason = cpp_backend_unavailable_reason()
    backends = ["reference"] if reason else ["cpp", "reference"]
    if reason:
        print(f"cpp backend unavailable ({reason}); timing the reference backend only")
    cases = [c for c in CASES if args.cases is None or c["case"] in args.cases]
    rows = [bench_case(c, tuple(args.size), backends, args.repeats, args.warmup, not args.no_train) for c in cases]
    add_baseline_ratios(rows, cases, backends)

    columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("case", "size")))
    print(f"{'case':32s} " + " ".join(f"{c:>22s}" for c in columns))
    for row in rows:
        print(f"{row['case']:32s} " + " ".join(f"{row.get(c, float('nan')):22.3f}" for c in columns))
    print(json.dumps({
        "benchmark": "detectors", "threads": torch.get_num_threads(), "cpp_available": reason is None,
        "cpp_unavailable_reason": reason, "keep_freed_memory": kept, "rows": rows,
    }))


if __name__ == "__main__":
    main()
