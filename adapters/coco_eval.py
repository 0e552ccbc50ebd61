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
    :class:`dat_smt.shapes.ShapesDetectionDataset`; ground truth is built from it in memory (area = box area,
    no crowd). Returns ``AP, AP50, AP75, APs, APm, APl`` (-1 where a size range has no ground truth).
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
        for box, label in zip(_to_xywh(torch.as_tensor(target["boxes"]).reshape(-1, 4)),
                              torch.as_tensor(target["labels"]).reshape(-1).tolist()):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0,
            })
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
