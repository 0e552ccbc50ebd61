"""The example scripts run as a user runs them: subprocesses on generated data, tiny sizes, CPU."""
import contextlib
import csv
import importlib
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.v2.functional import pil_to_tensor

from dat_smt.shapes import write_coco_detection_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLS_ARGS = ["--model", "test_resnet", "--img-size", "64", "--batch-size", "16", "--workers", "0", "--no-progress",
            "--warmup-epochs", "0", "--lr", "5e-3", "--smoothing", "0", "--no-aug"]


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_cls")
    run("make_shapes_dataset.py", "classification", root, "--train", 16, "--val", 0, "--num-classes", 4)
    # Evaluating on the training images: a few CPU epochs of a tiny model fit them but do not generalise yet.
    (root / "val").symlink_to(root / "train", target_is_directory=True)
    return root


def read_log(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_make_shapes_dataset_is_seeded(tmp_path):
    for name in ("a", "b"):
        run("make_shapes_dataset.py", "detection", tmp_path / name, "--train", 2, "--val", 1, "--seed", 3)
    for rel in ("annotations/instances_train.json", "train/000000.png", "val/000000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert run("make_shapes_dataset.py", "--help").stdout.startswith("usage")


def test_classification_bad_data_dir(tmp_path):
    result = run("finetune_classification.py", "--data", tmp_path, check=False)
    assert result.returncode != 0 and "train/ and val/" in result.stderr


@pytest.mark.slow
def test_classification_learns(cls_data, tmp_path):
    run("finetune_classification.py", "--data", cls_data, "--epochs", 4, "--output", tmp_path, *CLS_ARGS)
    rows = read_log(tmp_path / "log.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["top1"] > rows[0]["top1"]
    for name in ("best.safetensors", "last.safetensors", "curves.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_classification_resume_matches_uninterrupted(cls_data, tmp_path):
    args = ["--data", cls_data, "--epochs", 3, *CLS_ARGS]
    run("finetune_classification.py", *args, "--output", tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "finetune_classification.py"), *map(str, args),
                                "--output", str(interrupted)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = interrupted / "last_state.pt"
    deadline = time.monotonic() + 300
    while not state_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    saved_epoch = torch.load(state_file, weights_only=True)["epoch"]
    assert saved_epoch < 2, "the run finished before it could be interrupted"
    result = run("finetune_classification.py", *args, "--output", interrupted, "--resume", state_file)
    assert f"at epoch {saved_epoch + 1}" in result.stdout
    full = torch.load(tmp_path / "full" / "last_state.pt", weights_only=True)
    resumed = torch.load(state_file, weights_only=True)
    assert resumed["epoch"] == full["epoch"] == 2
    assert resumed["scheduler"] == full["scheduler"]
    assert resumed["optimizer"]["param_groups"] == full["optimizer"]["param_groups"]
    for key, value in full["optimizer"]["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][key][name], tensor)
    full_weights = load_file(tmp_path / "full" / "last.safetensors")
    resumed_weights = load_file(interrupted / "last.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor)
    assert len(read_log(interrupted / "log.csv")) == 3


@pytest.mark.slow
def test_classification_torchrun_matches_single_process(cls_data, tmp_path):
    # LayerNorm model (no BatchNorm), no augmentation, SGD (Adam would amplify float noise in near-zero
    # gradients): 2 ranks x 8 images == 1 process x 16 images.
    args = ["--data", cls_data, "--epochs", 1, "--model", "test_vit", "--img-size", "64", "--model-kwargs",
            "img_size=64", "--workers", 0, "--no-progress", "--warmup-epochs", 0, "--opt", "sgd", "--lr", "0.1",
            "--weight-decay", 0, "--smoothing", 0, "--no-aug"]
    run("finetune_classification.py", *args, "--batch-size", 16, "--output", tmp_path / "single")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(EXAMPLES / "finetune_classification.py"), *map(str, args), "--batch-size", "8",
                             "--output", str(tmp_path / "ddp")], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    single = load_file(tmp_path / "single" / "last.safetensors")
    ddp = load_file(tmp_path / "ddp" / "last.safetensors")
    assert single.keys() == ddp.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-5)


# --- detection ---------------------------------------------------------------------------------------------------

DET_ARGS = ["--backbone", "resnet18", "--backbone-kwargs", "trainable_stages=-1", "--no-aug", "--eval-size", 96,
            "--max-size", 112, "--batch-size", 4, "--workers", 0, "--lr", "1e-3", "--no-progress"]
TINY_DETECTORS = {
    "deformable_detr": ["d_model=32", "nhead=4", "num_encoder_layers=1", "num_decoder_layers=2", "dim_feedforward=32",
                        "num_queries=8", "dropout=0.0"],
    "smca": ["d_model=32", "num_heads=4", "num_encoder_layers=1", "num_decoder_layers=2", "dim_feedforward=32",
             "num_queries=8"],
    "focus_detr": ["d_model=32", "nhead=4", "num_encoder_layers=2", "num_decoder_layers=2", "dim_feedforward=32",
                   "num_queries=12", "topk_sa=8", "dn_number=4"],
}
DET_EPOCHS = 3


def detector_args(name: str) -> list:
    return ["--detector", name, "--detector-kwargs", *TINY_DETECTORS[name], *DET_ARGS]


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def det_data(tmp_path_factory) -> Path:
    """4 + 2 images of 64 x 64 (equal sizes: batches need no padding, so 1 and 2 processes see the same pixels);
    the last training image has no annotation, and two extra boxes need clipping and dropping."""
    root = tmp_path_factory.mktemp("shapes_coco")
    run("make_shapes_dataset.py", "detection", root, "--train", 4, "--val", 2, "--min-size", 64, "--max-size", 64,
        "--max-objects", 2, "--num-classes", 2)

    def add_bad_boxes(coco):
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 4]
        common = {"image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0}
        coco["annotations"] += [{"id": 1001, "bbox": [50.0, 40.0, 30.0, 10.0], **common},
                                {"id": 1002, "bbox": [10.0, 10.0, 0.0, 5.0], **common}]

    edit_json(root / "annotations" / "instances_train.json", add_bad_boxes)
    return root


@pytest.fixture(scope="module")
def deformable_run(det_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("deformable_detr")
    result = run("finetune_detection.py", "--data", det_data, "--epochs", DET_EPOCHS, "--output", output,
                 *detector_args("deformable_detr"))
    return output, result


def finetune_detection_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("finetune_detection")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture
def small_coco(tmp_path) -> Path:
    write_coco_detection_dataset(tmp_path, 3, min_size=32, max_size=32, max_objects=2)
    return tmp_path


def test_detection_coco_loader_bad_data(small_coco):
    load = finetune_detection_module().load_coco_split
    ann_file = small_coco / "annotations" / "instances_train.json"
    clean = json.loads(ann_file.read_text())

    def split_after(edit):
        coco = json.loads(json.dumps(clean))
        edit(coco)
        ann_file.write_text(json.dumps(coco))
        return load(small_coco / "train", ann_file)

    def add(coco, **ann):
        coco["annotations"].append({"id": 77, "image_id": 2, "category_id": 1, "iscrowd": 0, **ann})

    split = split_after(lambda coco: add(coco, bbox=[20.0, -4.0, 30.0, 10.0]))
    assert split.boxes[1].tolist()[-1] == [20.0, 0.0, 32.0, 6.0]
    assert any("clipped 1 box" in w and "77" in w for w in split.warnings)

    split = split_after(lambda coco: add(coco, bbox=[5.0, 5.0, 3.0, 0.0]))
    assert sum(len(b) for b in split.boxes) == len(clean["annotations"])
    assert any("dropped 1 box" in w and "77" in w for w in split.warnings)

    split = split_after(lambda coco: coco.update(annotations=[a for a in coco["annotations"] if a["image_id"] != 1]))
    assert len(split.files) == 3 and split.boxes[0].shape == (0, 4) and split.labels[0].shape == (0,)

    with pytest.raises(ValueError, match=r"annotation 77 \(image 2, 000001.png\) has category_id 9.*\[1, 2, 3, 4\]"):
        split_after(lambda coco: add(coco, bbox=[1.0, 1.0, 5.0, 5.0], category_id=9))
    with pytest.raises(ValueError, match=r"annotation 77 has bbox \[1.0, 1.0, -5.0, 5.0\]"):
        split_after(lambda coco: add(coco, bbox=[1.0, 1.0, -5.0, 5.0]))

    (small_coco / "train" / "000002.png").unlink()
    with pytest.raises(ValueError, match=r"1 image file\(s\).*000002.png.*--skip-missing-images"):
        split_after(lambda coco: None)
    split = load(small_coco / "train", ann_file, skip_missing_images=True)
    assert len(split.files) == 2 and any("000002.png" in w for w in split.warnings)


class FixedDetections(torch.nn.Module):
    """A detector that answers the images it is given with ``outputs``, one per image in order."""

    def __init__(self, outputs: list[dict], num_classes: int):
        super().__init__()
        self.outputs = iter(outputs)
        self.num_classes = num_classes

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [next(self.outputs) for _ in images]


def test_detection_evaluation_keeps_crowd_regions_and_annotation_areas(small_coco):
    """Evaluation sees every annotation as in the file (crowd regions, areas, unclipped boxes), training only the
    clipped non-crowd boxes, so ``evaluate_coco`` on the val items gives pycocotools' numbers on the file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dat_smt.adapters import evaluate_coco
    from dat_smt.adapters.coco_eval import COCO_METRIC_NAMES

    module = finetune_detection_module()
    ann_file = small_coco / "annotations" / "instances_train.json"

    def crowd_area_and_outside_box(coco):
        coco["annotations"][0]["area"] = 2000.0  # medium by its (segmentation) area, small by its box
        common = {"image_id": 2, "category_id": 1}
        coco["annotations"] += [{"id": 98, "bbox": [20.0, -4.0, 30.0, 10.0], "area": 150.0, "iscrowd": 0, **common},
                                {"id": 99, "bbox": [2.0, 3.0, 20.0, 25.0], "area": 300.0, "iscrowd": 1, **common}]

    edit_json(ann_file, crowd_area_and_outside_box)
    coco = json.loads(ann_file.read_text())
    split = module.load_coco_split(small_coco / "train", ann_file)
    assert any("1 crowd annotation(s) ignored in training" in w for w in split.warnings)
    train_items = module.CocoDetection(split)
    eval_items = module.CocoDetection(split, evaluation=True)
    label_of = {cid: label for label, cid in enumerate(split.category_ids)}
    for index, image_id in enumerate(split.image_ids):
        annotations = [a for a in coco["annotations"] if a["image_id"] == image_id]
        _, target = eval_items[index]
        assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
        assert target["labels"].tolist() == [label_of[a["category_id"]] for a in annotations]
        assert target["area"].tolist() == [a["area"] for a in annotations]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in annotations]
        _, train_target = train_items[index]
        assert len(train_target["boxes"]) == len(train_target["labels"]) == sum(not a["iscrowd"] for a in annotations)
    assert train_items[1][1]["boxes"].tolist()[-1] == [20.0, 0.0, 32.0, 6.0]
    assert [2.0, 3.0, 22.0, 28.0] not in train_items[1][1]["boxes"].tolist()

    # per image: every box moved a little, and one of category 1 inside the crowd region of image 2 (elsewhere a
    # false positive)
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for target in split.eval_targets:
        boxes = torch.cat([target["boxes"].float() + torch.rand(len(target["boxes"]), 4, generator=generator) * 2 - 1,
                           torch.tensor([[5.0, 8.0, 20.0, 26.0]])])
        outputs.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=generator) * 0.5 + 0.5,
                        "labels": torch.cat([target["labels"], torch.tensor([label_of[1]])])})
    results = [
        {"image_id": image_id, "category_id": split.category_ids[label], "score": score,
         "bbox": [x0, y0, x1 - x0, y1 - y0]}
        for image_id, out in zip(split.image_ids, outputs)
        for (x0, y0, x1, y1), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(ann_file))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = evaluator.stats[:6].tolist()

    def metrics(items) -> list[float]:
        found = evaluate_coco(FixedDetections(outputs, len(split.category_ids)), items, device="cpu")
        return [found[name] for name in COCO_METRIC_NAMES]

    assert metrics(eval_items) == pytest.approx(expected, abs=1e-6)
    # the training targets (no crowd, box areas, clipped) score otherwise: the check above depends on the fields
    assert metrics(train_items) != pytest.approx(expected, abs=1e-3)

    edit_json(ann_file, lambda coco: coco["annotations"][-1].update(area=-1.0))
    with pytest.raises(ValueError, match=r"annotation 99 has area -1.0; expected a finite number >= 0"):
        module.load_coco_split(small_coco / "train", ann_file)


def test_detection_bad_data_fails_before_training(small_coco):
    def unknown_category(coco):
        coco["annotations"][0]["category_id"] = 42

    edit_json(small_coco / "annotations" / "instances_train.json", unknown_category)
    result = run("finetune_detection.py", "--data", small_coco, "--val-split", "train", "--workers", 2, check=False)
    assert result.returncode == 2
    assert "annotation 1 (image 1, 000000.png) has category_id 42" in result.stderr
    assert "Traceback" not in result.stderr


def read_metrics(path: Path) -> list[dict]:
    metrics = json.loads(path.read_text())
    for row in metrics:
        assert set(row) == {"epoch", "AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(0 <= v <= 1 or v == -1 for k, v in row.items() if k != "epoch")
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("detector", list(TINY_DETECTORS))
def test_detection_loss_falls(detector, det_data, request, tmp_path):
    if detector == "deformable_detr":
        output, result = request.getfixturevalue("deformable_run")
    else:
        output = tmp_path
        result = run("finetune_detection.py", "--data", det_data, "--epochs", DET_EPOCHS, "--output", output,
                     *detector_args(detector))
    rows = read_log(output / "log.csv")
    assert [r["epoch"] for r in rows] == list(range(DET_EPOCHS))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows
    assert rows[-1]["loss_ce"] < rows[0]["loss_ce"], rows
    assert [m["epoch"] for m in read_metrics(output / "metrics.json")] == list(range(DET_EPOCHS))
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "curves.png", "model.json"):
        assert (output / name).is_file()
    # the bad boxes of det_data were clipped / dropped with a warning; the image without annotations trained
    assert "clipped 1 box(es)" in result.stderr and "(annotation ids 1001)" in result.stderr
    assert "dropped 1 box(es)" in result.stderr and "(annotation ids 1002)" in result.stderr


@pytest.mark.slow
def test_predict_draws_boxes_and_its_results_score_like_training(deformable_run, det_data, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dat_smt.adapters.coco_eval import COCO_METRIC_NAMES

    output, _ = deformable_run
    run("predict_detection.py", output / "last.safetensors", det_data / "val", "--output", tmp_path,
        "--annotations", det_data / "annotations" / "instances_val.json", "--score-threshold", 0, "--no-progress")
    palette = [torch.tensor(c, dtype=torch.uint8)[:, None, None] for c in [(230, 25, 75), (60, 180, 75)]]
    for name in ("000000.png", "000001.png"):
        before = pil_to_tensor(Image.open(det_data / "val" / name).convert("RGB"))
        after = pil_to_tensor(Image.open(tmp_path / name).convert("RGB"))
        assert after.shape == before.shape

        def box_pixels(image):
            return sum(int((image == colour).all(0).sum()) for colour in palette)

        assert box_pixels(after) > box_pixels(before) + 50
    # pycocotools on the results file against the annotation file reproduces the last epoch's metrics
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(det_data / "annotations" / "instances_val.json"))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "detections.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    last = read_metrics(output / "metrics.json")[-1]
    assert [last[k] for k in COCO_METRIC_NAMES] == pytest.approx(evaluator.stats[:6].tolist(), abs=1e-6)


@pytest.mark.slow
def test_detection_resume_matches_uninterrupted(deformable_run, det_data, tmp_path):
    full, _ = deformable_run
    args = ["--data", det_data, "--output", tmp_path, *detector_args("deformable_detr")]
    run("finetune_detection.py", *args, "--epochs", 1)
    result = run("finetune_detection.py", *args, "--epochs", DET_EPOCHS, "--resume", tmp_path / "last_state.pt")
    assert "resumed from" in result.stdout and "at epoch 1" in result.stdout
    full_state = torch.load(full / "last_state.pt", weights_only=True)
    resumed_state = torch.load(tmp_path / "last_state.pt", weights_only=True)
    assert resumed_state["epoch"] == full_state["epoch"] == DET_EPOCHS - 1
    assert resumed_state["lr_scheduler"] == full_state["lr_scheduler"]
    for name, tensor in full_state["model"].items():
        torch.testing.assert_close(resumed_state["model"][name], tensor)
    for resumed_row, full_row in zip(read_log(tmp_path / "log.csv"), read_log(full / "log.csv"), strict=True):
        assert resumed_row == pytest.approx(full_row)


@pytest.mark.slow
def test_detection_torchrun_matches_single_process(deformable_run, det_data, tmp_path):
    single, _ = deformable_run
    args = [*detector_args("deformable_detr"), "--batch-size", 2]  # 2 ranks x 2 images == 1 process x 4 images
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(EXAMPLES / "finetune_detection.py"), "--data", str(det_data), "--epochs",
                             str(DET_EPOCHS), "--output", str(tmp_path), *map(str, args)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "weights identical on all 2 ranks" in result.stdout
    single_state = torch.load(single / "last_state.pt", weights_only=True)["model"]
    ddp_state = torch.load(tmp_path / "last_state.pt", weights_only=True)["model"]
    assert single_state.keys() == ddp_state.keys()
    for name, tensor in single_state.items():
        torch.testing.assert_close(ddp_state[name], tensor, rtol=1e-3, atol=1e-4)


def test_detection_train_transforms_move_boxes_with_the_pixels():
    """The augmentation recipe (flip, multi-scale resize, resize + random crop + resize) keeps every box tight
    around its shape's pixels, whichever branch and crop are drawn; boxes cropped away are removed."""
    from torchvision import tv_tensors

    module = finetune_detection_module()
    transforms = module.train_transforms([96, 112, 128], 200, [80, 100], [40, 90])
    image = torch.zeros(3, 90, 120, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 5.0, 110.0, 30.0]])
    image[0, 20:60, 10:50] = 255
    image[1, 5:30, 70:110] = 255
    torch.manual_seed(0)
    random.seed(0)
    for _ in range(40):
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(90, 120)),
                  "labels": torch.tensor([0, 1])}
        out_image, out = transforms(tv_tensors.Image(image), target)
        assert out_image.dtype == torch.float32 and 96 <= min(out_image.shape[1:]) <= 128
        for box, label in zip(out["boxes"].tolist(), out["labels"].tolist()):
            rows, cols = (out_image[label] > 0.5).nonzero(as_tuple=True)
            pixels = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
            assert box == pytest.approx(pixels, abs=1.5)
        for label in set(range(2)) - set(out["labels"].tolist()):
            rows, cols = (out_image[label] > 0.5).nonzero(as_tuple=True)
            assert min(rows.unique().numel(), cols.unique().numel()) <= 2  # at most a sliver was left visible


@pytest.mark.slow
def test_detection_torchrun_focus_detr_with_a_batch_without_objects(det_data, tmp_path):
    # One image per rank: the step where a rank gets det_data's image without annotations leaves the denoising
    # label embedding without gradient there (DDP must look for unused parameters).
    args = [*detector_args("focus_detr"), "--batch-size", 1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(EXAMPLES / "finetune_detection.py"), "--data", str(det_data), "--epochs", "1",
                             "--output", str(tmp_path), *map(str, args)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "weights identical on all 2 ranks" in result.stdout
    assert len(read_metrics(tmp_path / "metrics.json")) == 1
