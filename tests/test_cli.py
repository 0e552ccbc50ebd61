"""The ``dat-smt`` command line, run as subprocesses, and the committed ``hf_configs/`` against ``default_cfgs``."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_hub_support import checkpoint_filter_fn, official_checkpoint

from dat_smt import cli, hub

TESTS_DIR = Path(__file__).resolve().parent
HF_CONFIGS = TESTS_DIR.parent / "hf_configs"


def run_cli(*args: str, standin: bool = True) -> subprocess.CompletedProcess:
    """Runs ``python -m dat_smt ARGS`` (with the stand-in family registered first when ``standin``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    if standin:
        cmd = [sys.executable, "-c", "import sys, test_hub_support; from dat_smt.cli import main; sys.exit(main())"]
    else:
        cmd = [sys.executable, "-m", "dat_smt"]
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hubstandin_tiny_official.pth"
    torch.save(official_checkpoint("hubstandin_tiny", seed=3), path)
    return path


def test_convert_and_push_dry_run_in_process(official, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli.main(["convert", "hubstandin_tiny.in1k", str(official), str(out), "--no-complexity"]) == 0
    assert "reload + forward: max abs diff 0.0" in capsys.readouterr().out
    weights = load_file(str(out / "model.safetensors"))
    source = torch.load(official, weights_only=True)["model"]
    assert torch.equal(weights["stages.3.0.weight"], source["layer3.weight"])
    assert cli.main(["push", str(out), "dat-smt/x", "--dry-run"]) == 0
    assert "would upload to dat-smt/x (public)" in capsys.readouterr().out
    assert cli.main(["push", str(tmp_path), "dat-smt/x", "--dry-run"]) == 2
    assert "missing config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_reload_forward_and_push_dry_run(official, tmp_path):
    out = tmp_path / "repo"
    result = run_cli("convert", "hubstandin_tiny.in1k", str(official), str(out))
    assert result.returncode == 0, result.stderr
    assert "reload + forward: max abs diff 0.0" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    # independent truth: the official weights pushed through the filter into a fresh model
    reference = timm.create_model("hubstandin_tiny").eval()
    reference.load_state_dict(checkpoint_filter_fn(torch.load(official, weights_only=True), reference))
    loaded = timm.create_model("hubstandin_tiny", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), reference(x))

    result = run_cli("push", str(out), "dat-smt/hubstandin_tiny.in1k", "--dry-run")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^\s+(\S+)\s+(\d+) bytes$", result.stdout, flags=re.M))
    assert listed == {p.name: str(p.stat().st_size) for p in out.iterdir()}



def test_convert_errors(official, tmp_path, capsys):
    assert cli.main(["convert", "hubstandin_small.in1k", str(official), str(tmp_path / "bad")]) == 2
    assert "looks like a `hubstandin_tiny` checkpoint" in capsys.readouterr().err
    assert cli.main(["convert", "hubstandin_tinny", str(official), str(tmp_path / "bad")]) == 2
    assert "Did you mean: hubstandin_tiny" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_list_shows_every_released_variant():
    result = run_cli("list", standin=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["model", "params(M)", "GMACs", "input", "top-1"]
    listed = [line.split()[0] for line in lines[1:] if not line.startswith("(")]
    assert listed == hub.released_variants()


@pytest.mark.slow
def test_predict_on_a_photograph(official, tmp_path):
    from PIL import Image
    from skimage import data
    from timm.data import ImageNetInfo
    from torchvision import transforms

    image_path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(image_path)
    result = run_cli("predict", "hubstandin_tiny", str(image_path), "--weights", str(official), "--topk", "3")
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 2) for line in result.stdout.strip().splitlines()]
    assert len(rows) == 3

    # independent preprocessing: resize the short side to 64 / 0.875, centre crop, ImageNet normalisation
    preprocess = transforms.Compose([
        transforms.Resize(int(64 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD),
    ])
    model = timm.create_model("hubstandin_tiny").eval()
    model.load_state_dict(checkpoint_filter_fn(torch.load(official, weights_only=True), model))
    with torch.no_grad():
        probs = model(preprocess(Image.open(image_path).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    values, indices = probs.topk(3)
    info = ImageNetInfo("imagenet-1k")
    for (p, i, label), value, index in zip(rows, values.tolist(), indices.tolist()):
        assert int(i) == index and abs(float(p) - value) < 2e-3
        assert label == info.index_to_description(index)


def test_hf_configs_generation(tmp_path):
    assert cli.main(["hf-configs", str(tmp_path), "--models", "hubstandin_tiny.in1k"]) == 0
    config = json.loads((tmp_path / "hubstandin_tiny.in1k" / "config.json").read_text())
    assert config["architecture"] == "hubstandin_tiny"
    assert sorted(os.listdir(tmp_path / "hubstandin_tiny.in1k")) == ["README.md", "config.json"]
    assert config["pretrained_cfg"]["crop_pct"] == 0.875


def test_committed_hf_configs_match_default_cfgs():
    released = hub.released_variants()
    committed = sorted(p.name for p in HF_CONFIGS.iterdir() if p.is_dir()) if HF_CONFIGS.is_dir() else []
    assert committed == sorted(released), "regenerate with `dat-smt hf-configs --reuse-complexity`"
    for name in released:
        cfg = timm.get_pretrained_cfg(name)
        config = json.loads((HF_CONFIGS / name / "config.json").read_text())
        pcfg = config["pretrained_cfg"]
        assert config["architecture"] == cfg.architecture and config["num_classes"] == cfg.num_classes, name
        for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "license", "crop_mode"):
            value = getattr(cfg, key)
            assert pcfg.get(key) == (list(value) if isinstance(value, tuple) else value), (name, key)
        assert config["complexity"]["gmacs"] > 0 and config["complexity"]["params_m"] > 0, name
        card = (HF_CONFIGS / name / "README.md").read_text()
        assert f"{hub.HF_HUB_ORG}/{name}" in card, name
