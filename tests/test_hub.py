"""Pretrained weights through a loopback Hugging Face Hub: hf-hub ids, url + on-the-fly conversion, clear errors.

huggingface_hub reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` when imported, so every download scenario runs in a
fresh interpreter with its own environment (temporary ``HF_HOME`` and ``TORCH_HOME``).
"""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest
import test_hub_support
import timm
import torch
from safetensors.torch import load_file
from test_hub_support import HubServer, official_checkpoint

from dat_smt import hub

TESTS_DIR = Path(__file__).resolve().parent
REPO = f"{hub.HF_HUB_ORG}/hubstandin_tiny.in1k"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Official-format checkpoints of both stand-in variants and their ``convert_checkpoint`` repo folders."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for variant in ("hubstandin_tiny", "hubstandin_small"):
        official = root / f"{variant}.pth"
        torch.save(official_checkpoint(variant, seed=len(variant)), official)
        summary = hub.convert_checkpoint(f"{variant}.in1k", official, root / f"{variant}.in1k")
        out[variant] = (official, Path(summary["out_dir"]), summary)
    narrow = root / "narrow.pth"
    torch.save(official_checkpoint("hubstandin_tiny", dims=(4, 8, 12, 16)), narrow)
    summary = hub.convert_checkpoint("hubstandin_tiny.in1k", narrow, root / "narrow",
                                     model_kwargs=dict(dims=(4, 8, 12, 16)))
    out["narrow"] = (narrow, Path(summary["out_dir"]), summary)
    return out


@pytest.fixture(scope="module")
def hub_server(converted):
    with HubServer() as server:
        server.repos[REPO] = converted["hubstandin_tiny"][1]
        server.repos[REPO + "_narrow"] = converted["narrow"][1]
        server.repos[REPO + "_truncated"] = converted["hubstandin_tiny"][1]
        server.truncated.add(f"/{REPO}_truncated/resolve/main/model.safetensors")
        for variant, (official, _, _) in converted.items():
            server.files[f"/official/{variant}.pth"] = official
            server.files[f"/truncated/{variant}.pth"] = official
            server.truncated.add(f"/truncated/{variant}.pth")
            server.files[f"/f/{variant}/"] = official  # a cloud-drive share link: no file name in the path
        yield server


def run_py(script: str, home: Path, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home / "hf"), TORCH_HOME=str(home / "torch"),
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    prelude = "import timm, torch\nimport test_hub_support\nfrom safetensors.torch import load_file\n"
    prelude += "from dat_smt import hub\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_convert_summary_and_exact_weights(converted):
    official, folder, summary = converted["hubstandin_tiny"]
    assert sorted(summary["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert summary["reload_max_abs_diff"] == 0.0
    weights = load_file(str(folder / "model.safetensors"))
    source = torch.load(official, weights_only=True)["model"]
    assert torch.equal(weights["stem.weight"], source["patch.weight"])
    assert torch.equal(weights["head.fc.bias"], source["fc.bias"])
    assert len(weights) == len(source)
    expected_params = sum(v.numel() for v in source.values()) / 1e6
    assert summary["params_m"] == round(expected_params, 2)


def test_hub_download_adaptation_and_offline(converted, hub_server, tmp_path):
    folder = converted["hubstandin_tiny"][1]
    checks = f"""
        ref = load_file({str(folder / 'model.safetensors')!r})
        def same(model, skip=()):
            sd = model.state_dict()
            assert set(sd) == set(ref), set(sd) ^ set(ref)
            for k, v in ref.items():
                if k not in skip:
                    assert torch.equal(sd[k], v), k
        same(timm.create_model('hf-hub:{REPO}', pretrained=True))
        same(hub.create_model('hubstandin_tiny', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='{REPO}')))
        m = timm.create_model('hf-hub:{REPO}', pretrained=True, num_classes=10)
        assert m.head.fc.weight.shape == (10, ref['head.fc.weight'].shape[1])
        same(m, skip=('head.fc.weight', 'head.fc.bias'))
        m = timm.create_model('hf-hub:{REPO}', pretrained=True, in_chans=1)
        assert torch.allclose(m.stem.weight, ref['stem.weight'].sum(1, keepdim=True))
        same_keys = [k for k in ref if k != 'stem.weight']
        assert all(torch.equal(m.state_dict()[k], ref[k]) for k in same_keys)
        f = timm.create_model('hubstandin_tiny', pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(hf_hub_id='{REPO}'))
        local = dict(file={str(folder / 'model.safetensors')!r})
        full = timm.create_model('hubstandin_tiny', pretrained_cfg_overlay=local, pretrained=True).eval()
        x = torch.randn(1, 3, 64, 64)
        feats = f.eval()(x)
        assert [t.shape[1] for t in feats] == [8, 16, 24, 32]
        assert torch.equal(feats[-1], full.forward_features(x))
    """
    home = tmp_path
    run_py(checks + f"""
        narrow = timm.create_model('hf-hub:{REPO}_narrow', pretrained=True)  # model_args from config.json
        ref_narrow = load_file({str(converted['narrow'][1] / 'model.safetensors')!r})
        assert narrow.num_features == 16
        assert all(torch.equal(narrow.state_dict()[k], v) for k, v in ref_narrow.items())
        try:
            hub.create_model('hf-hub:{hub.HF_HUB_ORG}/no_such_repo', pretrained=True)
        except hub.PretrainedWeightsError as e:
            assert 'does not exist' in str(e), e
        else:
            raise AssertionError('missing repo loaded')
        print('online ok')
    """, home, hub_server.url)
    n_requests = len(hub_server.requests)
    run_py(checks + f"""
        try:
            hub.create_model('hubstandin_small', pretrained=True,
                             pretrained_cfg_overlay=dict(hf_hub_id='{hub.HF_HUB_ORG}/hubstandin_small.in1k'))
        except hub.PretrainedWeightsError as e:
            assert 'no network' in str(e) and 'pretrained_cfg_overlay=dict(file=' in str(e), e
        else:
            raise AssertionError('offline load without a cache succeeded')
    """, home, hub_server.url, offline=True)
    assert len(hub_server.requests) == n_requests, "offline mode reached the server"


@pytest.mark.slow
def test_url_conversion_on_the_fly_and_errors(converted, hub_server, tmp_path):
    folder = converted["hubstandin_tiny"][1]
    small_folder = converted["hubstandin_small"][1]
    url = f"{hub_server.url}/official/hubstandin_tiny.pth"
    broken = f"{hub_server.url}/truncated/hubstandin_tiny.pth"
    run_py(f"""
        import os
        from pathlib import Path
        ref = load_file({str(folder / 'model.safetensors')!r})
        m = hub.create_model('hubstandin_tiny', pretrained=True, pretrained_cfg_overlay=dict(url={url!r}))
        assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.items())
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
        assert os.listdir(cache) == ['hubstandin_tiny.pth'], os.listdir(cache)
        os.remove(os.path.join(cache, 'hubstandin_tiny.pth'))
        try:
            hub.create_model('hubstandin_tiny', pretrained=True, pretrained_cfg_overlay=dict(url={broken!r}))
        except hub.PretrainedWeightsError as e:
            assert 'corrupt or truncated' in str(e) and 'removed' in str(e), e
        else:
            raise AssertionError('truncated download loaded')
        assert os.listdir(cache) == [], os.listdir(cache)
        try:
            hub.create_model('hubstandin_tiny', pretrained=True,
                             pretrained_cfg_overlay=dict(file={str(small_folder / 'model.safetensors')!r}))
        except hub.PretrainedWeightsError as e:
            assert '`hubstandin_small`' in str(e), e
        else:
            raise AssertionError('checkpoint of another variant loaded')
        try:
            hub.create_model('hf-hub:{REPO}_truncated', pretrained=True)
        except hub.PretrainedWeightsError as e:
            assert 'incomplete' in str(e), e
        else:
            raise AssertionError('truncated Hub download loaded')
        snapshots = list((Path(os.environ['HF_HOME']) / 'hub').rglob('snapshots/*/model.safetensors'))
        assert snapshots == [], snapshots
        timm.create_model('hf-hub:{REPO}', pretrained=True)
        cached = next((Path(os.environ['HF_HOME']) / 'hub').rglob('snapshots/*/model.safetensors')).resolve()
        cached.write_bytes(cached.read_bytes()[:500])  # a cache damaged after the download
        try:
            hub.create_model('hf-hub:{REPO}', pretrained=True)
        except hub.PretrainedWeightsError as e:
            assert 'corrupt or truncated' in str(e) and 'removed' in str(e), e
        else:
            raise AssertionError('corrupt cached Hub file loaded')
        model = hub.create_model('hf-hub:{REPO}', pretrained=True)  # downloaded afresh
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
        print('ok')
    """, tmp_path, hub_server.url)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="hubstandin_tiny"):
        hub.create_model("hubstandin_tinny")


def test_closest_variant_on_meta(converted):
    weights = load_file(str(converted["hubstandin_small"][1] / "model.safetensors"))
    name, score = hub.closest_variant(weights, ["hubstandin_tiny", "hubstandin_small"])
    assert (name, score) == ("hubstandin_small", 1.0)
    official = official_checkpoint("hubstandin_tiny")["model"]
    assert hub.closest_variant(official, ["hubstandin_tiny", "hubstandin_small"]) == ("hubstandin_tiny", 1.0)


def test_corrupt_file_is_reported(converted, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((converted["hubstandin_tiny"][1] / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(hub.PretrainedWeightsError, match="corrupt or truncated"):
        hub.create_model("hubstandin_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    assert bad.is_file(), "a user's own file must not be deleted"


def test_model_card_and_config(converted):
    folder = converted["hubstandin_tiny"][1]

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "hubstandin_tiny"
    assert config["num_classes"] == 1000 and config["num_features"] == 32
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 64, 64] and pcfg["interpolation"] == "bicubic" and pcfg["license"] == "apache-2.0"
    # convolutions and the classifier counted by hand: out_h * out_w * out_c * k * k * in_c
    hand_count = 16 * 16 * 8 * 48 + 16 * 16 * 8 * 72 + 8 * 8 * 16 * 72 + 4 * 4 * 24 * 144 + 2 * 2 * 32 * 216 + 32 * 1000
    assert config["complexity"]["macs"] == hand_count
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "features_only=True" in card and REPO in card
    assert timm.get_pretrained_cfg("hubstandin_tiny.in1k").url in card


def synthetic_official_checkpoint(manifest: dict, seed: int = 0) -> dict:
    """An official-format checkpoint with the manifest's keys, shapes and dtypes and random values."""
    generator = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape, dtype in manifest["state_dict"]:
        if dtype.startswith("float"):
            model[key] = torch.randn(shape, generator=generator)
        else:  # index tables and counters: the models rebuild or ignore them
            model[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return {"model": model, "epoch": 299}


@pytest.mark.slow
@pytest.mark.parametrize("model_name,manifest_name", [("dat_tiny", "dat_v1_tiny"), ("smt_tiny", "smt_tiny")])
def test_url_path_converts_real_variant_on_the_fly(model_name, manifest_name, reference_dir, tmp_path):
    """Plain timm downloads the official file from the cfg ``url`` and converts it through the family's filter.

    Served at the path of the real release link: DAT's is a share link without a file name, SMT's a GitHub file.
    """
    if not timm.is_model(model_name):
        pytest.skip(f"{model_name} is not registered yet")

    manifest = json.loads((reference_dir / "manifests" / f"{manifest_name}.json").read_text())
    official = tmp_path / f"{model_name}_official.pth"
    checkpoint = synthetic_official_checkpoint(manifest)
    torch.save(checkpoint, official)
    buffers = set(manifest["buffer_keys"])
    # the conversion only renames and reshapes, so the multiset of parameter values is preserved
    expected = torch.sort(torch.cat([v.flatten() for k, v in checkpoint["model"].items() if k not in buffers]))[0]
    torch.save(expected, tmp_path / "expected.pt")
    del checkpoint
    with HubServer() as server:
        url = served_link(server, timm.get_pretrained_cfg(f"{model_name}.in1k").url, official)
        run_py(f"""
            model = timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(url={url!r}))
            values = torch.sort(torch.cat([p.detach().flatten() for p in model.parameters()]))[0]
            assert torch.equal(values, torch.load({str(tmp_path / 'expected.pt')!r})), 'parameter values differ'
            assert model(torch.randn(1, *model.pretrained_cfg['input_size'])).shape == (1, 1000)
        """, tmp_path, server.url)


def test_url_without_network_says_how_to_load_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(hub.PretrainedWeightsError) as info:
        hub.create_model("hubstandin_tiny", pretrained=True)  # the cfg url points at a closed port
    message = str(info.value)
    assert "no network" in message and "pretrained_cfg_overlay=dict(file=" in message
    assert timm.get_pretrained_cfg("hubstandin_tiny.in1k").url in message
    cache = tmp_path / "hub" / "checkpoints"
    assert not cache.exists() or not any(cache.iterdir()), "a failed download left a file in the cache"


def test_hf_hub_cfg_only_for_published_weights(monkeypatch):
    assert hub.hf_hub_cfg("dat_tiny.in1k") == {}
    monkeypatch.setattr(hub, "PUBLISHED_WEIGHTS", frozenset({"dat_tiny.in1k"}))
    assert hub.hf_hub_cfg("dat_tiny.in1k") == {"hf_hub_id": f"{hub.HF_HUB_ORG}/dat_tiny.in1k"}


SMT_ARGS = ("in_chans", "embed_dims", "ca_num_heads", "sa_num_heads", "mlp_ratios", "qkv_bias", "use_layerscale",
            "layerscale_value", "depths", "ca_attentions", "head_conv", "expand_ratio")


def official_fixture(reference_dir: Path, name: str):
    """A reference fixture: constructor kwargs (without the class count), class count, tensors, official weights."""
    meta = json.loads((reference_dir / "fixtures" / f"{name}.json").read_text())
    tensors = load_file(str(reference_dir / "fixtures" / f"{name}.safetensors"))
    official = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    kwargs = dict(meta["constructor_kwargs"])
    num_classes = kwargs.pop("num_classes")
    if meta["family"] == "smt":
        kwargs = {k: kwargs[k] for k in SMT_ARGS}
    return kwargs, num_classes, tensors, official


def register_release(monkeypatch, pretrained_name: str, **changes) -> None:
    """Changes the registered pretrained cfg itself (as a release moving would), so timm takes its real path."""
    cfg = dataclasses.replace(timm.get_pretrained_cfg(pretrained_name), **changes)
    for name in (pretrained_name, cfg.architecture):  # the bare architecture name shares the default tag's cfg
        monkeypatch.setitem(timm.models._registry._model_pretrained_cfgs, name, cfg)


def served_link(server: HubServer, official_url: str, file: Path) -> str:
    """``official_url`` with the loopback server as its host, serving ``file`` at the same path and query."""
    parts = urllib.parse.urlparse(official_url)
    server.files[parts.path] = file
    return f"{server.url}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def assert_same(model_state, expected, skip=()):
    assert set(model_state) == set(expected), set(model_state) ^ set(expected)
    for key, value in expected.items():
        if key not in skip:
            assert torch.equal(model_state[key], value), key


def test_plain_timm_loads_dat_share_link(reference_dir, tmp_path, monkeypatch):
    """``timm.create_model('dat_tiny', pretrained=True)`` with the cfg's share link (no file name) served here."""
    from dat_smt.dat import DAT, checkpoint_filter_fn

    kwargs, num_classes, tensors, official = official_fixture(reference_dir, "dat_v1_small")
    release = tmp_path / "release.pth"
    torch.save({"model": official, "optimizer": {}, "max_accuracy": 82.0, "epoch": 299}, release)
    expected = checkpoint_filter_fn({"model": official}, DAT(num_classes=num_classes, **kwargs))
    official_url = timm.get_pretrained_cfg("dat_tiny.in1k").url
    assert os.path.basename(urllib.parse.urlparse(official_url).path) == "", "the case under test: no file name"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with HubServer() as server:
        link = served_link(server, official_url, release)
        register_release(monkeypatch, "dat_tiny.in1k", url=link, num_classes=num_classes)

        model = timm.create_model("dat_tiny", pretrained=True, **kwargs).eval()
        assert_same(model.state_dict(), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=1e-4, rtol=0)
        cached = f"dat_tiny.in1k-{hashlib.sha256(link.encode()).hexdigest()[:8]}.pth"
        assert sorted(p.name for p in cache.iterdir()) == [cached]
        assert server.requests == [("GET", link[len(server.url):])]

        backbone = timm.create_model("dat_tiny", pretrained=True, features_only=True, **kwargs).eval()
        with torch.no_grad():
            features = backbone(tensors["input"])
        for i, feature in enumerate(features):
            torch.testing.assert_close(feature, tensors[f"stage{i}"], atol=2e-4, rtol=1e-4)
        ten = timm.create_model("dat_tiny", pretrained=True, num_classes=10, **kwargs)
        assert ten.head.weight.shape == (10, expected["head.weight"].shape[1])
        assert_same(ten.state_dict(), expected, skip=("head.weight", "head.bias"))
        gray = timm.create_model("dat_tiny", pretrained=True, in_chans=1, **kwargs)
        assert torch.allclose(gray.stem[0].weight, expected["stem.0.weight"].sum(1, keepdim=True))
        assert_same(gray.state_dict(), expected, skip=("stem.0.weight",))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert_same(timm.create_model("dat_tiny", pretrained=True, **kwargs).state_dict(), expected)
        assert len(server.requests) == 1, "the cached copy was not reused"
        assert sorted(p.name for p in cache.iterdir()) == [cached]


def test_plain_timm_share_link_failures_leave_nothing_cached(tmp_path, monkeypatch):
    official = official_checkpoint("hubstandin_tiny", seed=5)
    release = tmp_path / "release.pth"
    torch.save(official, release)
    page = tmp_path / "expired.html"
    page.write_text("<html><body>This share link has expired.</body></html>")
    expected = test_hub_support.checkpoint_filter_fn(official, None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "torch" / "hub" / "checkpoints"

    def cached():
        return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []

    def load(link, **kwargs):
        return timm.create_model("hubstandin_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=link), **kwargs)

    with HubServer() as server:
        server.files.update({"/f/good/": release, "/f/cut/": release, "/f/expired/": page})
        server.truncated.add("/f/cut/")
        with pytest.raises(hub.PretrainedWeightsError, match="incomplete") as info:
            load(f"{server.url}/f/cut/?dl=1")
        assert "pretrained_cfg_overlay=dict(file=" in str(info.value)
        assert cached() == []
        with pytest.raises(hub.PretrainedWeightsError, match="did not send a PyTorch checkpoint"):
            load(f"{server.url}/f/expired/?dl=1")
        with pytest.raises(hub.PretrainedWeightsError, match="answered HTTP 404"):
            load(f"{server.url}/f/moved/?dl=1")
        assert cached() == []

        good = f"{server.url}/f/good/?dl=1"
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        n_requests = len(server.requests)
        with pytest.raises(hub.PretrainedWeightsError, match="no network") as info:
            load(good)
        assert "offline" in str(info.value) and "pretrained_cfg_overlay=dict(file=" in str(info.value)
        assert len(server.requests) == n_requests and cached() == []
        monkeypatch.delenv("HF_HUB_OFFLINE")

        assert_same(load(good).state_dict(), expected)
        assert len(cached()) == 1 and len(server.requests) == n_requests + 1
        (cache / cached()[0]).write_bytes(page.read_bytes())  # a cache damaged after the download
        assert_same(load(good, num_classes=10).state_dict(), expected, skip=("head.fc.weight", "head.fc.bias"))
        assert len(server.requests) == n_requests + 2, "the damaged copy was not fetched again"
        # hub.create_model goes through the same builder hook and reuses the same cached file
        assert_same(hub.create_model("hubstandin_tiny", pretrained=True,
                                     pretrained_cfg_overlay=dict(url=good)).state_dict(), expected)
        assert len(server.requests) == n_requests + 2 and len(cached()) == 1


def test_plain_timm_loads_smt_release_url(reference_dir, tmp_path, monkeypatch):
    """SMT's GitHub release urls have file names: timm's own download path, unchanged by the builder hook."""
    from dat_smt.smt import SMT, checkpoint_filter_fn

    kwargs, num_classes, tensors, official = official_fixture(reference_dir, "smt_small")
    official_url = timm.get_pretrained_cfg("smt_tiny.in1k").url
    release = tmp_path / "smt_tiny.pth"
    torch.save({"model": official, "epoch": 299}, release)
    expected = checkpoint_filter_fn({"model": official}, SMT(num_classes=num_classes, **kwargs))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with HubServer() as server:
        register_release(monkeypatch, "smt_tiny.in1k", url=served_link(server, official_url, release),
                         num_classes=num_classes)
        model = timm.create_model("smt_tiny", pretrained=True, **kwargs).eval()
        assert_same(model.state_dict(), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=1e-4, rtol=0)
        backbone = timm.create_model("smt_tiny", pretrained=True, features_only=True, **kwargs).eval()
        assert backbone.feature_info.channels() == list(kwargs["embed_dims"])
        ten = timm.create_model("smt_tiny", pretrained=True, **dict(kwargs, num_classes=10, in_chans=1))
        assert ten.head.weight.shape == (10, expected["head.weight"].shape[1])
        stem = "patch_embed1.conv.0.weight"
        assert torch.allclose(ten.state_dict()[stem], expected[stem].sum(1, keepdim=True))
        assert_same(ten.state_dict(), expected, skip=("head.weight", "head.bias", stem))
        assert len(server.requests) == 1
    assert sorted(p.name for p in (tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == ["smt_tiny.pth"]
