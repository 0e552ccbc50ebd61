import torch
from pycocotools.coco import COCO
from torchvision.datasets import ImageFolder

from dat_smt.shapes import (
    SHAPE_CLASSES,
    ShapesDetectionDataset,
    render_background,
    render_shape,
    write_coco_detection_dataset,
    write_image_folder_dataset,
)


def test_shape_box_is_tight_around_painted_pixels():
    generator = torch.Generator().manual_seed(0)
    for kind in SHAPE_CLASSES:
        image = render_background(64, 80, generator)
        colour = torch.tensor([1.0, 0.0, 1.0])
        box = render_shape(image, kind, (10.3, 20.7, 50.2, 60.1), colour)
        painted = (image == colour[:, None, None]).all(0)
        rows, cols = painted.any(1).nonzero(), painted.any(0).nonzero()
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert 10 <= box[0] and box[2] <= 51 and 20 <= box[1] and box[3] <= 61


def test_dataset_is_seeded_and_varied():
    dataset = ShapesDetectionDataset(6, min_size=40, max_size=60, seed=3)
    first, again = dataset[2], dataset[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    sizes = {tuple(dataset[i][0].shape[1:]) for i in range(6)}
    assert len(sizes) > 1
    for i in range(6):
        image, target = dataset[i]
        assert image.min() >= 0 and image.max() <= 1
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all()
    other_seed = ShapesDetectionDataset(6, 40, 60, seed=4)[2][0]
    assert other_seed.shape != first[0].shape or not torch.equal(other_seed, first[0])


def test_coco_and_image_folder_files(tmp_path):
    annotation_file = write_coco_detection_dataset(tmp_path, 5, min_size=32, max_size=48, seed=1)
    coco = COCO(str(annotation_file))
    dataset = ShapesDetectionDataset(5, 32, 48, seed=1)
    assert len(coco.getImgIds()) == 5
    assert sum(len(dataset[i][1]["labels"]) for i in range(5)) == len(coco.getAnnIds())
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    folder = ImageFolder(str(write_image_folder_dataset(tmp_path, 2, image_size=24)))
    assert folder.classes == sorted(SHAPE_CLASSES) and len(folder) == 2 * len(SHAPE_CLASSES)
