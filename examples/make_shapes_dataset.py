"""Generate a seeded synthetic dataset of coloured shapes on textured backgrounds.

    python examples/make_shapes_dataset.py detection runs/shapes_coco --train 200 --val 50
    python examples/make_shapes_dataset.py classification runs/shapes_cls --train 50 --val 10

``detection`` writes COCO format (``<root>/<split>/*.png`` + ``<root>/annotations/instances_<split>.json``,
category ids 1..K); ``classification`` writes ImageFolder (``<root>/<split>/<class>/*.png``; counts are per class).
The same arguments always produce the same files; train and val use different seeds.
"""
import argparse
from pathlib import Path

from dat_smt.shapes import SHAPE_CLASSES, write_coco_detection_dataset, write_image_folder_dataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["detection", "classification"])
    parser.add_argument("root", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=200, help="training images (per class for classification)")
    parser.add_argument("--val", type=int, default=50, help="validation images (per class for classification)")
    parser.add_argument("--num-classes", type=int, default=len(SHAPE_CLASSES), help="number of shape classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=96, help="detection: smallest image side")
    parser.add_argument("--max-size", type=int, default=128, help="detection: largest image side")
    parser.add_argument("--max-objects", type=int, default=3, help="detection: most shapes per image")
    parser.add_argument("--image-size", type=int, default=64, help="classification: image side")
    parser.add_argument("--distractors", type=int, default=0, help="classification: small shapes behind the main one")
    args = parser.parse_args(argv)
    if not 1 <= args.num_classes <= len(SHAPE_CLASSES):
        parser.error(f"--num-classes must be in 1..{len(SHAPE_CLASSES)}, got {args.num_classes}")
    if args.train < 1 or args.val < 0:
        parser.error("--train must be >= 1 and --val >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        if count == 0:
            continue
        if args.task == "detection":
            out = write_coco_detection_dataset(
                args.root, count, args.min_size, args.max_size, seed, args.max_objects, args.num_classes, split)
        else:
            out = write_image_folder_dataset(
                args.root, count, args.image_size, seed, args.num_classes, split, args.distractors)
        print(f"{split}: {count} {'images' if args.task == 'detection' else 'images per class'} -> {out}")


if __name__ == "__main__":
    main()
