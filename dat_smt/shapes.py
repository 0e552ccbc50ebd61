"""Seeded synthetic data: coloured shapes on textured backgrounds, for detection and classification.

The README demo, the tests, the examples and the convergence benchmarks train on it: every box is known exactly,
so a detector that learns shows it within minutes on a CPU.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

__all__ = [
    "SHAPE_CLASSES",
    "render_background",
    "render_shape",
    "render_detection_sample",
    "ShapesDetectionDataset",
    "write_coco_detection_dataset",
    "write_image_folder_dataset",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def render_background(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A (3, H, W) float image in [0, 1]: a colour gradient, low-frequency blobs and pixel noise."""
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    corners = torch.rand(4, 3, generator=generator) * 0.6 + 0.2
    gradient = (
        corners[0, :, None, None] * (1 - ys) * (1 - xs) + corners[1, :, None, None] * (1 - ys) * xs
        + corners[2, :, None, None] * ys * (1 - xs) + corners[3, :, None, None] * ys * xs
    )
    coarse = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=generator) - 0.5
    blobs = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    noise = (torch.rand(3, height, width, generator=generator) - 0.5) * 0.15
    return (gradient + 0.3 * blobs + noise).clamp(0, 1)


def _shape_mask(kind: str, height: int, width: int, box: Tuple[float, float, float, float]) -> torch.Tensor:
    """Boolean (H, W) mask of a shape that exactly fills ``box`` (x0, y0, x1, y1), sampled at pixel centres."""
    x0, y0, x1, y1 = box
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    u = (xs - x0) / (x1 - x0)
    v = (ys - y0) / (y1 - y0)
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == "square":
        return inside
    if kind == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if kind == "triangle":
        return inside & (v >= 1 - 2 * u) & (v >= 2 * u - 1)
    if kind == "cross":
        return inside & (((u - 0.5).abs() <= 0.17) | ((v - 0.5).abs() <= 0.17))
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_CLASSES}")


def render_shape(
        image: torch.Tensor, kind: str, box: Tuple[float, float, float, float], colour: torch.Tensor
) -> torch.Tensor:
    """Paints a shape of ``colour`` (3,) into ``image`` (3, H, W) in place and returns the tight pixel box."""
    mask = _shape_mask(kind, image.shape[1], image.shape[2], box)
    image[:, mask] = colour[:, None]
    rows = mask.any(1).nonzero()
    cols = mask.any(0).nonzero()
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


def render_detection_sample(
        height: int,
        width: int,
        generator: torch.Generator,
        max_objects: int = 4,
        min_size: float = 0.15,
        max_size: float = 0.5,
        num_classes: int = len(SHAPE_CLASSES),
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One image (3, H, W) in [0, 1] with 0..max_objects shapes, and its target.

    The target holds ``boxes`` (K, 4) absolute xyxy tight around the painted pixels (objects painted later may
    overlap earlier ones) and ``labels`` (K,) indices into ``SHAPE_CLASSES``.
    """
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
    image = render_background(height, width, generator)
    count = int(torch.randint(0, max_objects + 1, (), generator=generator))
    boxes, labels = [], []
    short = min(height, width)
    for _ in range(count):
        size = _uniform(generator, min_size, max_size) * short
        aspect = _uniform(generator, 0.7, 1.4)
        box_w = max(4.0, min(width - 1.0, size * math.sqrt(aspect)))
        box_h = max(4.0, min(height - 1.0, size / math.sqrt(aspect)))
        x0 = _uniform(generator, 0, width - box_w)
        y0 = _uniform(generator, 0, height - box_h)
        label = int(torch.randint(0, num_classes, (), generator=generator))
        colour = torch.rand(3, generator=generator)
        colour[int(torch.randint(0, 3, (), generator=generator))] = float(torch.randint(0, 2, (), generator=generator))
        boxes.append(render_shape(image, SHAPE_CLASSES[label], (x0, y0, x0 + box_w, y0 + box_h), colour))
        labels.append(label)
    target = {
        "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return image, target


class ShapesDetectionDataset(Dataset):
    """In-memory detection dataset of ``length`` seeded images; item ``i`` is the same for a given seed.

    Image sizes vary in ``[min_size, max_size]`` per side so that batching and padding get exercised.
    """

    def __init__(
            self,
            length: int,
            min_size: int = 96,
            max_size: int = 128,
            seed: int = 0,
            max_objects: int = 3,
            num_classes: int = len(SHAPE_CLASSES),
    ):
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if not 8 <= min_size <= max_size:
            raise ValueError(f"need 8 <= min_size <= max_size, got {min_size} and {max_size}")
        self.length = length
        self.min_size = min_size
        self.max_size = max_size
        self.seed = seed
        self.max_objects = max_objects
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        height, width = torch.randint(self.min_size, self.max_size + 1, (2,), generator=generator).tolist()
        return render_detection_sample(
            height, width, generator, max_objects=self.max_objects, num_classes=self.num_classes
        )


def write_coco_detection_dataset(
        root: Path,
        num_images: int,
        min_size: int = 96,
        max_size: int = 128,
        seed: int = 0,
        max_objects: int = 3,
        num_classes: int = len(SHAPE_CLASSES),
        split: str = "train",
) -> Path:
    """Writes ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json`` in COCO format.

    Category ids start at 1 (COCO style) and follow ``SHAPE_CLASSES``. Returns the annotation file path.
    """
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDetectionDataset(num_images, min_size, max_size, seed, max_objects, num_classes)
    images: List[dict] = []
    annotations: List[dict] = []
    for index in range(num_images):
        image, target = dataset[index]
        file_name = f"{index:06d}.png"
        to_pil_image(image).save(image_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[1], "width": image.shape[2]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": index + 1,
                "category_id": label + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            })
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES[:num_classes])
    ]
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file


def write_image_folder_dataset(
        root: Path,
        images_per_class: int,
        image_size: int = 64,
        seed: int = 0,
        num_classes: int = len(SHAPE_CLASSES),
        split: str = "train",
        background_shapes: int | None = None,
) -> Path:
    """Writes an ImageFolder classification set ``root/<split>/<class>/*.png``: one large shape per image.

    ``background_shapes`` small distractor shapes of random classes are painted first (default: none).
    Returns ``root/<split>``.
    """
    split_dir = Path(root) / split
    generator = torch.Generator().manual_seed(seed)
    for label in range(num_classes):
        class_dir = split_dir / SHAPE_CLASSES[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            image = render_background(image_size, image_size, generator)
            for _ in range(background_shapes or 0):
                size = _uniform(generator, 0.1, 0.2) * image_size
                x0, y0 = _uniform(generator, 0, image_size - size), _uniform(generator, 0, image_size - size)
                kind = SHAPE_CLASSES[int(torch.randint(0, num_classes, (), generator=generator))]
                render_shape(image, kind, (x0, y0, x0 + size, y0 + size), torch.rand(3, generator=generator))
            size = _uniform(generator, 0.4, 0.8) * image_size
            x0, y0 = _uniform(generator, 0, image_size - size), _uniform(generator, 0, image_size - size)
            colour = torch.rand(3, generator=generator)
            render_shape(image, SHAPE_CLASSES[label], (x0, y0, x0 + size, y0 + size), colour)
            to_pil_image(image).save(class_dir / f"{index:05d}.png")
    return split_dir
