"""The example scripts run as a user runs them: subprocesses on generated data, tiny sizes, CPU."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
