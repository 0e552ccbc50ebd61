"""evaluate_coco against pycocotools run directly on the same ground truth and detections."""
import contextlib
import io

import pytest
import torch
from torch import nn

from dat_smt.adapters import evaluate_coco
from dat_smt.adapters.coco_eval import COCO_METRIC_NAMES

pytest.importorskip("pycocotools")

SIZE_HW = (200, 300)
# per image: ground truth (xyxy box, 0-based label, annotation area, iscrowd) and detections (xyxy, score, label)
GROUND_TRUTH = [
    [([10, 10, 60, 60], 0, 900.0, 0), ([100, 20, 250, 150], 0, 15000.0, 1), ([150, 160, 190, 195], 1, 1000.0, 0)],
    [([20, 30, 120, 100], 1, 5000.0, 0), ([130, 100, 280, 190], 1, 9000.0, 1)],
]
DETECTIONS = [
    [([12, 11, 61, 58], 0.9, 0), ([120, 40, 180, 100], 0.8, 0), ([150, 158, 192, 196], 0.6, 1),
     ([0, 150, 40, 190], 0.7, 1)],
    [([22, 28, 118, 104], 0.85, 1), ([140, 110, 200, 170], 0.95, 1), ([200, 10, 260, 60], 0.3, 0)],
]


class StoredDetections(nn.Module):
    """Returns the stored detections of each image, recognised by its pixel value (image k is filled with k)."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        outputs = []
        for image in images:
            boxes, scores, labels = zip(*DETECTIONS[int(image[0, 0, 0])])
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                            "labels": torch.tensor(labels)})
        return outputs


def _dataset(with_annotation_fields: bool):
    data = []
    for k, annotations in enumerate(GROUND_TRUTH):
        boxes, labels, areas, crowd = zip(*annotations)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        if with_annotation_fields:
            target.update(area=torch.tensor(areas), iscrowd=torch.tensor(crowd))
        data.append((torch.full((3, *SIZE_HW), float(k)), target))
    return data


def _pycocotools_metrics(with_annotation_fields: bool) -> dict:
    """The same evaluation written directly as a COCO ground-truth dict and a results list."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    annotations, results = [], []
    for image_id, (truth, detections) in enumerate(zip(GROUND_TRUTH, DETECTIONS), start=1):
        for box, label, area, crowd in truth:
            bbox = xywh(box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "bbox": bbox,
                "area": area if with_annotation_fields else bbox[2] * bbox[3],
                "iscrowd": crowd if with_annotation_fields else 0,
            })
        results += [{"image_id": image_id, "category_id": label + 1, "bbox": xywh(box), "score": score}
                    for box, score, label in detections]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 1, "height": SIZE_HW[0], "width": SIZE_HW[1]} for i in range(len(GROUND_TRUTH))],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "0"}, {"id": 2, "name": "1"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(COCO_METRIC_NAMES, evaluator.stats[:6].tolist()))


@pytest.mark.parametrize("with_annotation_fields", [True, False])
def test_evaluate_coco_matches_pycocotools(with_annotation_fields):
    metrics = evaluate_coco(StoredDetections(), _dataset(with_annotation_fields), batch_size=1)
    assert metrics == pytest.approx(_pycocotools_metrics(with_annotation_fields), abs=1e-12)


def test_crowd_and_annotation_areas_change_the_metrics():
    """Detections on crowd regions stop being false positives, and annotation areas move boxes between size
    ranges (the first box: 50x50, but a small object by its 900-pixel annotation area)."""
    with_fields = evaluate_coco(StoredDetections(), _dataset(True))
    boxes_only = evaluate_coco(StoredDetections(), _dataset(False))
    assert with_fields["AP"] > boxes_only["AP"]
    assert with_fields["APs"] >= 0 and boxes_only["APs"] == -1


def test_annotation_fields_must_match_the_boxes():
    data = _dataset(True)
    data[1][1]["iscrowd"] = torch.tensor([0])
    with pytest.raises(ValueError, match="dataset item 1: 2 boxes but 1 iscrowd"):
        evaluate_coco(StoredDetections(), data)
