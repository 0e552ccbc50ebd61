"""Quick demo: runs multi-scale deformable attention on a Deformable-DETR-sized problem and checks it against
the pure PyTorch reference, then generates a small shapes dataset and fine-tunes a tiny classifier on it with
examples/finetune_classification.py (CPU, no network, about a minute).

    python examples/quickstart.py
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from dat_smt.ops import MSDeformAttn, ms_deform_attn_reference, multi_scale_deformable_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300, help="number of decoder queries")
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart"), help="dataset and run folder")
    parser.add_argument("--skip-training", action="store_true", help="only the op demo")
    args = parser.parse_args()

    torch.manual_seed(0)
    shapes = torch.tensor([[50, 84], [25, 42], [13, 21], [7, 11]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(shapes.prod(1).sum())
    attn = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4).eval()
    memory = torch.randn(1, tokens, 256)
    queries = torch.randn(1, args.queries, 256)
    reference_points = torch.rand(1, args.queries, 4, 2)
    with torch.inference_mode():
        start = time.perf_counter()
        out = attn(queries, reference_points, memory, shapes, starts)
        elapsed = time.perf_counter() - start
        value = torch.randn(1, tokens, 8, 32)
        locations = torch.rand(1, args.queries, 8, 4, 4, 2)
        weights = torch.rand(1, args.queries, 8, 4, 4)
        diff = (multi_scale_deformable_attention(value, shapes, starts, locations, weights)
                - ms_deform_attn_reference(value, shapes, starts, locations, weights)).abs().max()
    print(f"MSDeformAttn: {args.queries} queries over {tokens} tokens -> {tuple(out.shape)} in {elapsed * 1e3:.1f} ms")
    print(f"max |op - reference| = {diff:.2e}")
    if not args.skip_training:
        train_demo(args.output)


def train_demo(output: Path) -> None:
    """Generates 4 classes x 16 shapes images and trains timm's tiny ``test_resnet`` on them for 4 epochs."""
    examples = Path(__file__).resolve().parent
    data = output / "shapes_cls"
    subprocess.run([sys.executable, str(examples / "make_shapes_dataset.py"), "classification", str(data),
                    "--train", "16", "--val", "4", "--num-classes", "4"], check=True)
    subprocess.run([sys.executable, str(examples / "finetune_classification.py"), "--data", str(data),
                    "--output", str(output / "classification"), "--model", "test_resnet", "--img-size", "64",
                    "--epochs", "4", "--batch-size", "16", "--workers", "0", "--warmup-epochs", "0", "--lr", "5e-3",
                    "--smoothing", "0", "--no-aug", "--no-progress"], check=True)
    print(f"log, curves and checkpoints in {output / 'classification'}")


if __name__ == "__main__":
    main()
