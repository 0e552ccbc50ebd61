"""End-to-end CPU timing of the DETR-family detectors: the MSDA ``cpp`` backend against the ``reference`` one.

Every case builds one detector (random weights, official sizes) and times, in this process, batch-1 inference
and one training step (forward, backward, AdamW step) with every ``MSDeformAttn`` set to ``cpp`` and then to the
pure PyTorch ``reference``. Prints a table, then LAST one JSON line with the times and the reference / cpp ratios.

    python benchmarks/detectors.py                       # Deformable DETR (multi-scale, refine), 800 x 1216
    python benchmarks/detectors.py --size 512 768 --no-train

Add a detector by appending to ``CASES`` (name, ``create_detector`` arguments).
"""
import argparse
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
        "options": dict(backbone="resnet50", num_classes=91, num_feature_levels=4, with_box_refine=True),
    },
    {
        # Token selection vs keep ratio 1.0 (encoder FLOPs, wall clock): benchmarks/detectors_focus_detr.py.
        "case": "focus_detr_r50",
        "detector": "focus_detr",
        "options": dict(backbone="resnet50", num_classes=80),
    },
]


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


def _time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(case: Dict[str, Any], size, backends, repeats: int, warmup: int, train: bool) -> Dict[str, Any]:
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

    row: Dict[str, Any] = {"case": case["case"], "size": list(size)}
    for backend in backends:
        model.set_msda_backend(backend)
        row[f"infer_{backend}_s"] = _time(infer, repeats, warmup)
        if train:
            row[f"train_step_{backend}_s"] = _time(train_step, repeats, warmup)
    if "cpp" in backends:
        row["infer_speedup"] = row["infer_reference_s"] / row["infer_cpp_s"]
        if train:
            row["train_step_speedup"] = row["train_step_reference_s"] / row["train_step_cpp_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = cpp_backend_unavailable_reason()
    backends = ["reference"] if reason else ["cpp", "reference"]
    if reason:
        print(f"cpp backend unavailable ({reason}); timing the reference backend only")
    cases = [c for c in CASES if args.cases is None or c["case"] in args.cases]
    rows = [bench_case(c, tuple(args.size), backends, args.repeats, args.warmup, not args.no_train) for c in cases]

    columns = [k for k in rows[0] if k not in ("case", "size")]
    print(f"{'case':32s} " + " ".join(f"{c:>22s}" for c in columns))
    for row in rows:
        print(f"{row['case']:32s} " + " ".join(f"{row[c]:22.3f}" for c in columns))
    print(json.dumps({
        "benchmark": "detectors", "threads": torch.get_num_threads(), "cpp_available": reason is None,
        "cpp_unavailable_reason": reason, "rows": rows,
    }))


if __name__ == "__main__":
    main()
