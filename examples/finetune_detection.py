"""Train a DETR-family detector (deformable_detr, smca, focus_detr) on any timm backbone on a COCO-format dataset.

    python examples/make_shapes_dataset.py detection runs/shapes_coco --train 200 --val 50
    python examples/finetune_detection.py --data runs/shapes_coco --detector deformable_detr --backbone resnet18 \\
        --detector-kwargs d_model=64 num_queries=20 --epochs 12 --lr-drop 10 --output runs/det
    torchrun --nproc_per_node 2 examples/finetune_detection.py --data runs/shapes_coco ...
    python examples/finetune_detection.py --data /data/coco --train-split train2017 --val-split val2017 \\
        --backbone dat_tiny --pretrained-backbone --official-sizes --batch-size 2 --epochs 50 --lr-drop 40

Data: ``<data>/<split>/`` holds the images and ``<data>/annotations/instances_<split>.json`` the COCO annotations
(the layout of ``make_shapes_dataset.py detection`` and of COCO 2017). Category ids map to contiguous labels in
increasing id order; the val categories must equal the train ones.

Training follows the Deformable DETR recipe: random horizontal flip, then either a multi-scale resize of the
shorter side (``--scales``, longer side at most ``--max-size``) or a resize to ``--crop-resize``, a random crop
of side in ``--crop-size`` and the multi-scale resize; AdamW, the backbone at ``--lr * --lr-backbone-mult`` and the
parameters named ``sampling_offsets`` / ``reference_points`` at ``--lr * --lr-linear-proj-mult``; gradient norm
clipping; the learning rate times 0.1 after ``--lr-drop`` epochs. The default sizes are scaled down for CPUs;
``--official-sizes`` selects the paper's (scales 480..800, max 1333, crop resize 400/500/600, crop 384..600,
evaluation at 800).

Every epoch evaluates COCO box AP with pycocotools (``dat_smt.adapters.evaluate_coco``) on the val split, with
the shorter side resized to ``--eval-size`` and boxes mapped back to the original image. The ground truth is every
annotation as the file gives it: its bbox (not clipped), its ``area`` (which sets the small / medium / large
ranges; the box area where it is missing) and its ``iscrowd`` (crowd regions, which detections may match without
counting as false positives and which are never misses). The numbers are therefore those of the official
evaluation of the same detections against the annotation file (``predict_detection.py --annotations`` writes them
as a results file), images left out by ``--skip-missing-images`` aside. Every epoch also writes to ``--output``:
``metrics.json`` (AP, AP50, AP75, APs, APm, APl per epoch), ``log.csv``, ``curves.png``, ``last.safetensors`` and
``best.safetensors`` (weights; their metadata and ``model.json`` hold what ``predict_detection.py`` needs to rebuild
the model) and ``last_state.pt`` (weights, optimizer, lr schedule, epoch, RNG; ``torch.load(weights_only=True)``).
Files are written to a temporary name and renamed, so a killed run leaves complete files; ``--resume
<output>/last_state.pt`` continues after the saved epoch.

Bad data is checked in the main process before training:
  missing image file          error listing the files (``--skip-missing-images``: drop them with a warning)
  unknown category id         error naming the annotation id, its image and the category id
  unknown image id            error naming the annotation id
  malformed bbox              error naming the annotation id (not 4 finite numbers, or negative width/height)
  malformed area              error naming the annotation id (not a finite number >= 0)
  box partly outside image    clipped to the image for training, with a warning naming the annotation ids
  zero-size box               dropped from training (also after clipping), with a warning naming the annotation ids
  crowd annotation            ignored in training (as DETR does), kept as a crowd region for evaluation
  image without annotations   kept: it trains the "no object" class
An image whose decoded size differs from its JSON width/height is reported (naming the file) when it is loaded.

Under torchrun, DDP uses gloo on CPU and nccl on GPU, ``--batch-size`` is per process, losses are averaged over
all ranks, rank 0 evaluates and only rank 0 writes files.
"""
import argparse
import datetime
import json
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm
from training_common import (
    all_reduce_sum,
    broadcast_from_main,
    cleanup_distributed,
    load_state,
    parse_kwargs,
    plain_args,
    plot_curves,
    rng_state,
    save_state,
    save_weights,
    set_rng_state,
    setup_distributed,
    write_csv,
    write_json,
)

from dat_smt.adapters import create_detector, evaluate_coco, list_detectors
from dat_smt.adapters.coco_eval import COCO_METRIC_NAMES

CPU_SIZES = {"scales": list(range(288, 481, 32)), "max_size": 800, "crop_resize": [240, 300, 360],
             "crop_size": [230, 360], "eval_size": 480}
OFFICIAL_SIZES = {"scales": list(range(480, 801, 32)), "max_size": 1333, "crop_resize": [400, 500, 600],
                  "crop_size": [384, 600], "eval_size": 800}
LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
LOG_FIELDS = ["epoch", "lr", "train_loss", *LOSS_NAMES, *COCO_METRIC_NAMES]
CONFIG_KEY = "dat_smt_detector"


class DataError(ValueError):
    """The dataset does not match what the script expects; the message names the offending item."""


@dataclass
class CocoSplit:
    """A validated COCO split. Per image: its file, id and size; the training targets (``boxes``: clipped xyxy boxes
    without crowd and zero-size ones, ``labels``: contiguous labels); and the evaluation ground truth
    (``eval_targets``: every annotation as in the file, ``{"boxes": xyxy, "labels", "area", "iscrowd"}``)."""

    files: list[Path] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    eval_targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _first(ids: list, limit: int = 5) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def load_coco_split(image_dir: Path, annotation_file: Path, skip_missing_images: bool = False) -> CocoSplit:
    """Reads and validates one split (see the bad-data table in the module docstring); raises :class:`DataError`."""
    if not annotation_file.is_file():
        raise DataError(f"annotation file {annotation_file} does not exist")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    try:
        coco = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{annotation_file} is not valid JSON: {error}") from error
    missing_keys = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing_keys:
        raise DataError(f"{annotation_file} lacks {missing_keys}; a COCO instances file has images, annotations "
                        "and categories")
    name = annotation_file.name
    split = CocoSplit()
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    split.category_ids = [int(c["id"]) for c in categories]
    split.class_names = [str(c.get("name", c["id"])) for c in categories]
    if not categories:
        raise DataError(f"{annotation_file} has no categories")
    if len(set(split.category_ids)) != len(split.category_ids):
        raise DataError(f"{annotation_file} has duplicate category ids: {split.category_ids}")
    label_of = {cid: index for index, cid in enumerate(split.category_ids)}

    images = {}
    missing_files = []
    for image in coco["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise DataError(f"{annotation_file}: image entry {image} lacks {key!r}")
        if image["id"] in images:
            raise DataError(f"{annotation_file}: image id {image['id']} appears twice")
        path = image_dir / image["file_name"]
        if not path.is_file():
            missing_files.append(str(path))
        images[image["id"]] = (path, int(image["width"]), int(image["height"]))
    if missing_files and not skip_missing_images:
        raise DataError(f"{len(missing_files)} image file(s) listed in {annotation_file} do not exist: "
                        f"{_first(missing_files)} (pass --skip-missing-images to train without them)")
    if missing_files:
        split.warnings.append(f"{name}: skipped {len(missing_files)} image(s) whose file does not exist: "
                              f"{_first(missing_files)}")

    per_image, annotated = defaultdict(list), defaultdict(list)
    clipped, dropped, crowd = [], [], 0
    for ann in coco["annotations"]:
        ann_id = ann.get("id", "?")
        if ann.get("image_id") not in images:
            raise DataError(f"{annotation_file}: annotation {ann_id} refers to image id {ann.get('image_id')}, "
                            "which is not in 'images'")
        path = images[ann["image_id"]][0]
        if ann.get("category_id") not in label_of:
            raise DataError(f"{annotation_file}: annotation {ann_id} (image {ann['image_id']}, {path.name}) has "
                            f"category_id {ann.get('category_id')}, which is not among the categories "
                            f"{split.category_ids}")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise DataError(f"{annotation_file}: annotation {ann_id} has bbox {bbox}; expected [x, y, width, "
                            "height] with finite numbers and width, height >= 0")
        x, y, w, h = map(float, bbox)
        area = ann.get("area", w * h)
        if not isinstance(area, (int, float)) or not math.isfinite(area) or area < 0:
            raise DataError(f"{annotation_file}: annotation {ann_id} has area {area}; expected a finite number >= 0")
        is_crowd = bool(ann.get("iscrowd", 0))
        annotated[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]], float(area), is_crowd))
        if is_crowd:
            crowd += 1
            continue
        _, width, height = images[ann["image_id"]]
        box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
               min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped.append(ann_id)
            continue
        if box != [x, y, x + w, y + h]:
            clipped.append(ann_id)
        per_image[ann["image_id"]].append((box, label_of[ann["category_id"]]))
    if clipped:
        split.warnings.append(f"{name}: clipped {len(clipped)} box(es) extending outside their image to the image "
                              f"for training (annotation ids {_first(clipped)})")
    if dropped:
        split.warnings.append(f"{name}: dropped {len(dropped)} box(es) of zero width or height inside the image "
                              f"from training (annotation ids {_first(dropped)})")
    if crowd:
        split.warnings.append(f"{name}: {crowd} crowd annotation(s) ignored in training, kept for evaluation")
    for image_id, (path, width, height) in images.items():
        if str(path) in missing_files:
            continue
        objects = per_image.get(image_id, [])
        split.files.append(path)
        split.image_ids.append(image_id)
        split.sizes.append((height, width))
        split.boxes.append(torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4))
        split.labels.append(torch.tensor([label for _, label in objects], dtype=torch.int64))
        boxes, labels, areas, crowds = zip(*annotated[image_id]) if annotated[image_id] else ((), (), (), ())
        split.eval_targets.append({
            # float64, so that the way back to [x, y, width, height] for pycocotools keeps the file's numbers
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float64),
            "iscrowd": torch.tensor(crowds, dtype=torch.int64),
        })
    if not split.files:
        raise DataError(f"{annotation_file} lists no usable image")
    return split


class RandomSizeCrop(v2.Transform):
    """Crops a random region whose width and height are drawn in [min_size, max_size] (bounded by the image)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = next(F.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        crop_h = random.randint(min(self.min_size, height), min(self.max_size, height))
        crop_w = random.randint(min(self.min_size, width), min(self.max_size, width))
        return {"top": random.randint(0, height - crop_h), "left": random.randint(0, width - crop_w),
                "height": crop_h, "width": crop_w}

    def transform(self, inpt, params: dict):
        return F.crop(inpt, **params)


def train_transforms(scales: list[int], max_size: int, crop_resize: list[int], crop_size: list[int]) -> v2.Transform:
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([
            v2.RandomShortestSize(scales, max_size),
            v2.Compose([
                v2.RandomShortestSize(crop_resize),
                RandomSizeCrop(*crop_size),
                v2.RandomShortestSize(scales, max_size),
            ]),
        ]),
        v2.SanitizeBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
    ])


class CocoDetection(Dataset):
    """(image (3, H, W) float in [0, 1], target) of a :class:`CocoSplit`.

    The target is the training one, ``{"boxes": absolute xyxy, "labels": 0-based}`` through ``transforms``, or with
    ``evaluation`` the evaluation ground truth of :func:`evaluate_coco` (every annotation with its ``area`` and
    ``iscrowd``) for the image as it is.
    """

    def __init__(self, split: CocoSplit, transforms: v2.Transform | None = None, evaluation: bool = False):
        if evaluation and transforms is not None:
            raise ValueError("evaluation items are the images as they are: pass no transforms with evaluation=True")
        self.split = split
        self.transforms = transforms or v2.ToDtype(torch.float32, scale=True)
        self.evaluation = evaluation

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, index: int):
        path = self.split.files[index]
        try:
            with Image.open(path) as pil_image:
                image = F.pil_to_tensor(pil_image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot decode image {path}: {error}") from error
        size = tuple(image.shape[-2:])
        if size != self.split.sizes[index]:
            height, width = self.split.sizes[index]
            raise DataError(f"image {path} is {size[1]}x{size[0]} (width x height) but its annotation says "
                            f"{width}x{height}")
        if self.evaluation:
            return F.to_dtype(image, torch.float32, scale=True), dict(self.split.eval_targets[index])
        target = {
            "boxes": tv_tensors.BoundingBoxes(self.split.boxes[index], format="XYXY", canvas_size=size),
            "labels": self.split.labels[index],
        }
        image, target = self.transforms(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {"boxes": target["boxes"].as_subclass(torch.Tensor),
                                                 "labels": target["labels"]}


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class ResizedDetector(nn.Module):
    """Runs ``detector`` on images whose shorter side is resized to ``size`` (longer side at most ``max_size``)
    and maps the boxes back to each input image: inference at the training scale, results in input pixels."""

    def __init__(self, detector: nn.Module, size: int, max_size: int):
        super().__init__()
        self.detector = detector
        self.size = size
        self.max_size = max_size
        self.num_classes = detector.num_classes

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        resized = [F.resize(image, [self.size], max_size=self.max_size) for image in images]
        outputs = self.detector(resized)
        for image, small, out in zip(images, resized, outputs):
            scale_x = image.shape[-1] / small.shape[-1]
            scale_y = image.shape[-2] / small.shape[-2]
            out["boxes"] = out["boxes"] * out["boxes"].new_tensor([scale_x, scale_y, scale_x, scale_y])
        return outputs


def build_detector(config: dict) -> nn.Module:
    """The model described by a ``model.json`` / checkpoint-metadata config (see :func:`detector_config`)."""
    return create_detector(config["detector"], backbone=config["backbone"], num_classes=len(config["class_names"]),
                           backbone_kwargs=config["backbone_kwargs"], **config["detector_kwargs"])


def detector_config(args: argparse.Namespace, split: CocoSplit) -> dict:
    return {
        "detector": args.detector, "backbone": args.backbone,
        "detector_kwargs": parse_kwargs(args.detector_kwargs, "--detector-kwargs"),
        "backbone_kwargs": parse_kwargs(args.backbone_kwargs, "--backbone-kwargs"),
        "class_names": split.class_names, "category_ids": split.category_ids,
        "eval_size": args.eval_size, "max_size": args.max_size,
    }


def param_groups(model: nn.Module, lr: float, backbone_mult: float, linear_proj_mult: float) -> list[dict]:
    """Deformable DETR's groups: backbone, sampling offsets / reference points, and the rest."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "backbone" in name.split("."):
            groups["backbone"].append(param)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(param)
        else:
            groups["rest"].append(param)
    mults = {"backbone": backbone_mult, "linear_proj": linear_proj_mult, "rest": 1.0}
    return [{"params": params, "lr": lr * mults[key], "name": key} for key, params in groups.items() if params]


def check_replicas_in_sync(model: nn.Module, device: torch.device) -> None:
    """Raises if any rank's parameters or buffers differ bitwise from rank 0's (DDP keeps them equal)."""
    if not dist.is_initialized():
        return
    digest = torch.stack([
        torch.stack([t.double().sum(), t.double().square().sum()])
        for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()
    ]).to(device)
    reference = digest.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(digest, reference))], device=device)
    dist.all_reduce(differs)
    if differs.item():
        raise RuntimeError(f"the weights of {int(differs.item())} rank(s) differ from rank 0's after training")
    if dist.get_rank() == 0:
        print(f"weights identical on all {dist.get_world_size()} ranks")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True,
                      help="root with <split>/ images and annotations/instances_<split>.json")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val")
    data.add_argument("--skip-missing-images", action="store_true",
                      help="drop images whose file is missing (with a warning) instead of stopping")
    model = p.add_argument_group("model")
    model.add_argument("--detector", default="deformable_detr", choices=list_detectors())
    model.add_argument("--backbone", default="dat_tiny", help="any timm model with features_only support")
    model.add_argument("--pretrained-backbone", action="store_true", help="timm's pretrained backbone weights")
    model.add_argument("--detector-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                       help="create_detector options, e.g. d_model=64 num_queries=50 with_box_refine=True")
    model.add_argument("--backbone-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                       help="TimmBackbone / timm.create_model options, e.g. trainable_stages=-1")
    sizes = p.add_argument_group("image sizes (default: scaled down for CPUs)")
    sizes.add_argument("--official-sizes", action="store_true",
                       help="the paper's sizes; explicit size flags still override them")
    preset_help = "(CPU: {}; official: {})".format
    sizes.add_argument("--scales", type=int, nargs="+", default=argparse.SUPPRESS,
                       help="shorter-side sizes " + preset_help(CPU_SIZES["scales"], "480..800 step 32"))
    sizes.add_argument("--max-size", type=int, default=argparse.SUPPRESS,
                       help="longer side at most " + preset_help(CPU_SIZES["max_size"], OFFICIAL_SIZES["max_size"]))
    sizes.add_argument("--crop-resize", type=int, nargs="+", default=argparse.SUPPRESS,
                       help="shorter side before the random crop "
                            + preset_help(CPU_SIZES["crop_resize"], OFFICIAL_SIZES["crop_resize"]))
    sizes.add_argument("--crop-size", type=int, nargs=2, metavar=("MIN", "MAX"), default=argparse.SUPPRESS,
                       help="random crop side " + preset_help(CPU_SIZES["crop_size"], OFFICIAL_SIZES["crop_size"]))
    sizes.add_argument("--eval-size", type=int, default=argparse.SUPPRESS,
                       help="evaluation short side " + preset_help(CPU_SIZES["eval_size"], OFFICIAL_SIZES["eval_size"]))
    sizes.add_argument("--no-aug", action="store_true",
                       help="train on images resized like in evaluation only (no flip, crop or multi-scale), e.g. to "
                            "check that a model can overfit a few images")
    optim = p.add_argument_group("optimisation (defaults: Deformable DETR's)")
    optim.add_argument("--epochs", type=int, default=50)
    optim.add_argument("--batch-size", type=int, default=2, help="per process")
    optim.add_argument("--lr", type=float, default=2e-4)
    optim.add_argument("--lr-backbone-mult", type=float, default=0.1)
    optim.add_argument("--lr-linear-proj-mult", type=float, default=0.1,
                       help="lr multiplier of the sampling_offsets / reference_points parameters")
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--lr-drop", type=int, default=40, help="multiply the lr by 0.1 every this many epochs")
    optim.add_argument("--clip-max-norm", type=float, default=0.1, help="gradient norm clipping (0 = off)")
    run = p.add_argument_group("run")
    run.add_argument("--output", type=Path, default=Path("runs/detection"))
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resume", type=Path, default=None, help="a last_state.pt written by this script")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    preset = OFFICIAL_SIZES if args.official_sizes else CPU_SIZES
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.crop_size[0] > args.crop_size[1]:
        p.error(f"--crop-size MIN MAX needs MIN <= MAX, got {args.crop_size}")
    if args.resume is not None and not args.resume.is_file():
        p.error(f"--resume {args.resume} does not exist")
    try:
        parse_kwargs(args.detector_kwargs, "--detector-kwargs")
        parse_kwargs(args.backbone_kwargs, "--backbone-kwargs")
    except ValueError as error:
        p.error(str(error))
    return args


def load_data(args: argparse.Namespace) -> tuple[CocoSplit, CocoSplit]:
    splits = []
    for name in (args.train_split, args.val_split):
        splits.append(load_coco_split(args.data / name, args.data / "annotations" / f"instances_{name}.json",
                                      args.skip_missing_images))
    train, val = splits
    if (train.category_ids, train.class_names) != (val.category_ids, val.class_names):
        raise DataError(f"the {args.val_split} categories {list(zip(val.category_ids, val.class_names))} differ from "
                        f"the {args.train_split} ones {list(zip(train.category_ids, train.class_names))}")
    return train, val


def main(argv=None) -> None:
    args = parse_args(argv)
    # Rank 0 evaluates while the others wait: allow a long COCO evaluation before the collective times out.
    rank, world_size, device = setup_distributed(args.device, timeout=datetime.timedelta(hours=2))
    is_main = rank == 0
    progress = is_main and not args.no_progress
    try:
        train_split, val_split = load_data(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        cleanup_distributed()
        sys.exit(2)
    if is_main:
        for warning in train_split.warnings + val_split.warnings:
            print(f"warning: {warning}", file=sys.stderr)

    config = detector_config(args, train_split)
    torch.manual_seed(args.seed)
    model = build_detector(config).to(device)
    # Every rank starts from the same weights (above) but draws its own augmentations and denoising noise.
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)

    if args.no_aug:
        transforms = v2.Compose([v2.Resize(args.eval_size, max_size=args.max_size),
                                 v2.ToDtype(torch.float32, scale=True)])
    else:
        transforms = train_transforms(args.scales, args.max_size, args.crop_resize, args.crop_size)
    train_set = CocoDetection(train_split, transforms)
    val_set = CocoDetection(val_split, evaluation=True)
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    train_loader = DataLoader(train_set, args.batch_size, sampler=train_sampler, num_workers=args.workers,
                              collate_fn=collate)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr_backbone_mult, args.lr_linear_proj_mult),
                                  lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    start_epoch, best_ap, rows = 0, -1.0, []
    if args.resume is not None:
        state = load_state(args.resume)
        if state["config"] != config:
            print(f"error: --resume {args.resume} was trained with {state['config']}, which differs from this "
                  f"run's {config}; pass the same data, --detector, --backbone and kwargs", file=sys.stderr)
            cleanup_distributed()
            sys.exit(2)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch, best_ap, rows = state["epoch"] + 1, state["best_ap"], state["log"]
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {args.resume} at epoch {start_epoch}")

    # Focus-DETR's denoising label embedding gets no gradient on a rank whose batch holds no object.
    find_unused = args.detector == "focus_detr"
    train_model = DistributedDataParallel(model, find_unused_parameters=find_unused) if world_size > 1 else model
    if is_main:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "model.json").write_text(json.dumps(config, indent=2))
    evaluator = ResizedDetector(model, args.eval_size, args.max_size)
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        train_model.train()
        sums = dict.fromkeys(("loss", *LOSS_NAMES), 0.0)
        steps = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not progress)
        for images, targets in bar:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = train_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {steps}: "
                                         f"{ {k: v.item() for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
            optimizer.step()
            sums["loss"] += loss.item()
            for key in LOSS_NAMES:
                sums[key] += losses[key].item() if key in losses else 0.0
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        lr = optimizer.param_groups[-1]["lr"]
        lr_scheduler.step()
        *totals, total_steps = all_reduce_sum([*sums.values(), steps], device)
        means = {("train_loss" if k == "loss" else k): v / max(total_steps, 1) for k, v in zip(sums, totals)}
        metrics = None
        if is_main:
            eval_items = DataLoader(val_set, batch_size=None, num_workers=args.workers)
            metrics = evaluate_coco(evaluator, eval_items, num_classes=model.num_classes, batch_size=args.batch_size,
                                    device=device, progress=progress, category_names=train_split.class_names)
        metrics = broadcast_from_main(metrics)
        row = {"epoch": epoch, "lr": lr, **means, **metrics}
        rows.append(row)
        if not is_main:
            continue
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        metadata = {CONFIG_KEY: json.dumps(config), "epoch": str(epoch)}
        if metrics["AP"] > best_ap:
            best_ap = metrics["AP"]
            save_weights(model, args.output / "best.safetensors", metadata)
        save_weights(model, args.output / "last.safetensors", metadata)
        save_state({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "best_ap": best_ap, "log": rows,
            "rng": rng_state(), "config": config, "args": plain_args(args),
        }, args.output / "last_state.pt")
        write_json([{"epoch": r["epoch"], **{k: r[k] for k in COCO_METRIC_NAMES}} for r in rows],
                   args.output / "metrics.json")
        write_csv(rows, args.output / "log.csv", LOG_FIELDS)
        plot_curves(rows, args.output / "curves.png", [
            ("train loss", {"train_loss": "total", **{k: k for k in LOSS_NAMES}}),
            ("COCO box AP", {k: k for k in ("AP", "AP50", "AP75")}),
        ])
    check_replicas_in_sync(model, device)
    cleanup_distributed()


if __name__ == "__main__":
    main()
