"""Run a detector trained by finetune_detection.py on images: PNGs with the boxes drawn and COCO-format results.

    python examples/predict_detection.py runs/det runs/shapes_coco/val --output runs/det_pred
    python examples/predict_detection.py runs/det/last.safetensors photo.jpg --score-threshold 0.5
    python examples/predict_detection.py runs/det runs/shapes_coco/val --output runs/det_pred \\
        --annotations runs/shapes_coco/annotations/instances_val.json --score-threshold 0

The checkpoint is a ``.safetensors`` file written by finetune_detection.py (or its output folder: then
``best.safetensors``); its metadata (or ``--config model.json``) names the detector, backbone, options and
classes. Images are resized as in the training script's evaluation (shorter side ``--size``, longer side at most
``--max-size``; default: the values used in training) and the boxes mapped back to the original pixels.

Writes ``<output>/<image name>.png`` with every detection scoring at least ``--score-threshold`` drawn (box, class
name and score, one colour per class) and ``<output>/detections.json``: a COCO results list (``image_id``,
``category_id``, ``bbox`` [x, y, width, height], ``score``, plus ``file_name``) of the same detections. Image ids
come from ``--annotations`` (matched by file name, so pycocotools can score the file against it) or else number
the images 1, 2, ... in the order processed.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from finetune_detection import CONFIG_KEY, ResizedDetector, build_detector
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_model
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
"""Class colours (class i gets ``PALETTE[i % len(PALETTE)]``)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .safetensors from finetune_detection.py, or its output folder")
    p.add_argument("inputs", type=Path, nargs="+", help="image files or folders of images")
    p.add_argument("--output", type=Path, default=Path("runs/predictions"))
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this "
                   "(default 0.3)")
    p.add_argument("--config", type=Path, default=None, help="model.json, for a checkpoint without metadata")
    p.add_argument("--annotations", type=Path, default=None,
                   help="COCO instances JSON whose image ids (matched by file name) the results use")
    p.add_argument("--size", type=int, default=None, help="shorter side at inference (default: as in training)")
    p.add_argument("--max-size", type=int, default=None, help="longer side at most (default: as in training)")
    p.add_argument("--line-width", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.checkpoint.is_dir():
        args.checkpoint = args.checkpoint / "best.safetensors"
    if not args.checkpoint.is_file():
        p.error(f"checkpoint {args.checkpoint} does not exist")
    if not 0 <= args.score_threshold <= 1:
        p.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    return args


def read_config(checkpoint: Path, config_file: Path | None) -> dict:
    if config_file is not None:
        return json.loads(config_file.read_text())
    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata() or {}
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{checkpoint} has no {CONFIG_KEY!r} metadata; pass a checkpoint written by "
                         "finetune_detection.py or its model.json with --config")
    return json.loads(metadata[CONFIG_KEY])


def list_images(inputs: list[Path]) -> list[Path]:
    images = []
    for path in inputs:
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {inputs}")
    return images


def image_ids_from(annotations: Path) -> dict[str, int]:
    coco = json.loads(annotations.read_text())
    return {Path(image["file_name"]).name: int(image["id"]) for image in coco["images"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        config = read_config(args.checkpoint, args.config)
        images = list_images(args.inputs)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    ids_by_name = image_ids_from(args.annotations) if args.annotations else None
    device = torch.device(args.device)
    detector = build_detector(config)
    load_model(detector, args.checkpoint, device="cpu")
    model = ResizedDetector(detector, args.size or config["eval_size"], args.max_size or config["max_size"])
    model.to(device).eval()
    class_names, category_ids = config["class_names"], config["category_ids"]

    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    with torch.inference_mode():
        for index, path in enumerate(tqdm(images, desc="predicting", disable=args.no_progress), start=1):
            with Image.open(path) as pil_image:
                image = pil_to_tensor(pil_image.convert("RGB"))
            out = model([image.to(device).float() / 255])[0]
            keep = out["scores"] >= args.score_threshold
            boxes, scores, labels = out["boxes"][keep].cpu(), out["scores"][keep].cpu(), out["labels"][keep].cpu()
            if ids_by_name is not None:
                if path.name not in ids_by_name:
                    sys.exit(f"error: {path.name} is not among the images of {args.annotations}")
                image_id = ids_by_name[path.name]
            else:
                image_id = index
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                results.append({"image_id": image_id, "category_id": category_ids[label], "file_name": path.name,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
            drawn = image
            if len(boxes):
                names = [f"{class_names[k]} {s:.2f}" for k, s in zip(labels.tolist(), scores.tolist())]
                colours = [PALETTE[k % len(PALETTE)] for k in labels.tolist()]
                drawn = draw_bounding_boxes(image, boxes, labels=names, colors=colours, width=args.line_width)
            to_pil_image(drawn).save(args.output / f"{path.stem}.png")
    (args.output / "detections.json").write_text(json.dumps(results))
    print(f"{len(results)} detection(s) in {len(images)} image(s) -> {args.output}")


if __name__ == "__main__":
    main()
