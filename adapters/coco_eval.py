"""COCO box AP of a detector over any dataset of ``(image, target)`` pairs, computed with pycocotools."""
import contextlib
import io
from typing import Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

__all__ = ["COCO_METRIC_NAMES", "evaluate_coco"]

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_xywh(boxes: torch.Tensor) -> list:
    boxes = boxes.detach().to("cpu", torch.float64)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def _ground_truth(target: Dict[str, torch.Tensor], image_id: int, first_id: int) -> list:
    """COCO annotations of one target. ``area`` and ``iscrowd`` come from the target where it has them (as in a
    COCO file: e.g. segmentation areas, which set the size ranges, and crowd regions, which pycocotools matches
    without counting them as misses or their detections as false positives); else box area and 0."""
    boxes = _to_xywh(torch.as_tensor(target["boxes"]).reshape(-1, 4))
    columns = {"labels": [int(label) + 1 for label in torch.as_tensor(target["labels"]).reshape(-1).tolist()]}
    if "area" in target:
        columns["area"] = torch.as_tensor(target["area"], dtype=torch.float64).reshape(-1).tolist()
    else:
        columns["area"] = [w * h for _, _, w, h in boxes]
    if "iscrowd" in target:
        columns["iscrowd"] = [int(crowd) for crowd in torch.as_tensor(target["iscrowd"]).reshape(-1).tolist()]
    else:
        columns["iscrowd"] = [0] * len(boxes)
    for name, values in columns.items():
        if len(values) != len(boxes):
            raise ValueError(
                f"dataset item {image_id - 1}: {len(boxes)} boxes but {len(values)} {name}; expected one per box"
            )
    return [
        {"id": first_id + k, "image_id": image_id, "category_id": label, "bbox": box, "area": area, "iscrowd": crowd}
        for k, (box, label, area, crowd) in enumerate(zip(boxes, *columns.values()))
    ]


@torch.no_grad()
def evaluate_coco(
        model: nn.Module,
        dataset: Iterable[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
        num_classes: int | None = None,
        batch_size: int = 2,
        device: torch.device | None = None,
        progress: bool = False,
        category_names: Sequence[str] | None = None,
) -> Dict[str, float]:
    """Runs ``model`` (torchvision detection API) over ``dataset`` and returns COCO box metrics in [0, 1].

    ``dataset`` yields ``(image (3, H, W) in [0, 1], {"boxes": absolute xyxy, "labels": 0-based})``, e.g.
    :class:`dat_smt.shapes.ShapesDetectionDataset`, optionally with per-box ``"area"`` and ``"iscrowd"`` (the
    COCO annotation fields, as torchvision's COCO wrappers give them); ground truth is built from it in memory,
    with the box area and no crowd where those are absent. Returns ``AP, AP50, AP75, APs, APm, APl`` (-1 where a
    size range has no ground truth).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm import tqdm

    if device is None:
        device = next(model.parameters()).device
    num_classes = num_classes if num_classes is not None else model.num_classes
    was_training = model.training
    model.eval()
    images, annotations, detections = [], [], []
    batch: list = []

    def flush():
        outputs = model([img.to(device) for _, img, _ in batch])
        for (image_id, _, _), out in zip(batch, outputs):
            for box, score, label in zip(_to_xywh(out["boxes"]), out["scores"].tolist(), out["labels"].tolist()):
                detections.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": box, "score": score})
        batch.clear()

    items = tqdm(dataset, desc="evaluating", disable=not progress)
    for image_id, (image, target) in enumerate(items, start=1):
        images.append({"id": image_id, "height": int(image.shape[1]), "width": int(image.shape[2])})
        annotations += _ground_truth(target, image_id, len(annotations) + 1)
        batch.append((image_id, image, target))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)

    names = category_names or [str(i) for i in range(num_classes)]
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": names[i]} for i in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            return {name: 0.0 for name in COCO_METRIC_NAMES}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats[:6])}
