"""Pretrained weights through the Hugging Face Hub: repo folders, model cards and a diagnosing ``create_model``.

Weights flow through timm's own loader (``timm.models.load_pretrained``): a cfg with ``hf_hub_id`` downloads the
project's converted ``model.safetensors``; until a weight is published the cfg's ``url`` points at the official
release file, which timm downloads (into a temporary ``.partial`` file that is moved into place only once the
transfer ended) and converts on the fly with the family's ``checkpoint_filter_fn``. Release links without a file
name (cloud-drive share links), which timm cannot name in its cache, are fetched by :func:`with_release_file`,
which every family's builder calls. Loading is strict, so every key and shape is checked. :func:`create_model`
wraps ``timm.create_model`` and turns the low-level failures (offline, unknown name, corrupt file, checkpoint of
another variant) into errors that say what to do.
"""
import difflib
import functools
import hashlib
import http.client
import json
import logging
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

import timm
import torch
from timm.models import get_pretrained_cfg, is_model, model_entrypoint, resolve_pretrained_cfg, split_model_name_tag
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._checkpoint import check_state_dict, load_checkpoint, unwrap_state_dict

__all__ = [
    "HF_HUB_ORG", "PUBLISHED_WEIGHTS", "PretrainedWeightsError", "hub_repo_id", "hf_hub_cfg", "zoo_models",
    "released_variants", "paper_top1", "count_complexity", "hub_config", "model_card", "write_hub_folder",
    "convert_checkpoint", "closest_variant", "with_release_file", "fetch_release_file", "release_cache_file",
    "create_model",
]

_logger = logging.getLogger(__name__)

HF_HUB_ORG = "dat-smt"
"""The Hugging Face Hub organisation that hosts the project's converted weights (``<org>/<arch>.<tag>``)."""

PUBLISHED_WEIGHTS: frozenset = frozenset()
"""``arch.tag`` names whose converted weights are published under :data:`HF_HUB_ORG` (see :func:`hf_hub_cfg`)."""

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")

# Facts per family, keyed by the model-file module name timm records at registration.
FAMILY_INFO: Dict[str, Dict[str, str]] = {
    "dat": {
        "title": "DAT / DAT++: Vision Transformer with Deformable Attention",
        "papers": "https://arxiv.org/abs/2201.00520 (CVPR 2022), https://arxiv.org/abs/2309.01430 (DAT++)",
        "code": "https://github.com/LeapLabTHU/DAT",
        "citation": (
            "@inproceedings{xia2022vision,\n"
            "  title={Vision Transformer with Deformable Attention},\n"
            "  author={Xia, Zhuofan and Pan, Xuran and Song, Shiji and Li, Li Erran and Huang, Gao},\n"
            "  booktitle={CVPR},\n  year={2022}\n}\n"
            "@article{xia2023dat,\n"
            "  title={DAT++: Spatially Dynamic Vision Transformer with Deformable Attention},\n"
            "  author={Xia, Zhuofan and Pan, Xuran and Song, Shiji and Li, Li Erran and Huang, Gao},\n"
            "  journal={arXiv preprint arXiv:2309.01430},\n  year={2023}\n}"
        ),
    },
    "smt": {
        "title": "SMT: Scale-Aware Modulation Meet Transformer",
        "papers": "https://arxiv.org/abs/2307.08579 (ICCV 2023)",
        "code": "https://github.com/AFeng-x/SMT",
        "citation": (
            "@inproceedings{lin2023scale,\n"
            "  title={Scale-Aware Modulation Meet Transformer},\n"
            "  author={Lin, Weifeng and Wu, Ziheng and Chen, Jiayu and Huang, Jun and Jin, Lianwen},\n"
            "  booktitle={ICCV},\n  year={2023}\n}"
        ),
    },
}

# ImageNet-1k top-1 (%) reported by the official repositories, keyed by (architecture, evaluation resolution).
PAPER_TOP1: Dict[Tuple[str, int], float] = {
    ("dat_tiny", 224): 82.0, ("dat_small", 224): 83.7, ("dat_base", 224): 84.0,
    ("dat_base", 384): 84.8, ("dat_base_384", 384): 84.8,
    ("dat_pp_tiny", 224): 83.9, ("dat_pp_small", 224): 84.6, ("dat_pp_base", 224): 84.9,
    ("dat_pp_base", 384): 85.9, ("dat_pp_base_384", 384): 85.9,
    ("smt_tiny", 224): 82.2, ("smt_small", 224): 83.7, ("smt_base", 224): 84.3,
    ("smt_large", 224): 87.1, ("smt_large", 384): 88.1, ("smt_large_384", 384): 88.1,
}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the model; the message says what to do."""


def hub_repo_id(pretrained_name: str, org: str = HF_HUB_ORG) -> str:
    """Hub repo id of a pretrained variant: ``'dat_tiny.in1k'`` -> ``'dat-smt/dat_tiny.in1k'``."""
    return f"{org}/{pretrained_name}"


def hf_hub_cfg(pretrained_name: str) -> Dict[str, str]:
    """Pretrained-cfg entries for the project's Hub copy of ``pretrained_name``, for the families' ``default_cfgs``.

    ``{'hf_hub_id': '<org>/<arch>.<tag>'}`` once the name is in :data:`PUBLISHED_WEIGHTS`, else ``{}`` so that
    ``pretrained=True`` keeps using the cfg's official ``url`` (timm prefers ``hf_hub_id`` over ``url``, and a
    missing repo would not fall back). Usage: ``_cfg(url=OFFICIAL_URL, **hf_hub_cfg('dat_tiny.in1k'))``.
    """
    return {"hf_hub_id": hub_repo_id(pretrained_name)} if pretrained_name in PUBLISHED_WEIGHTS else {}


def _family(model_name: str) -> str:
    """timm module name of the family a registered architecture belongs to (``'dat'``, ``'smt'``)."""
    arch, _ = split_model_name_tag(model_name)
    return model_entrypoint(arch).__module__.rsplit(".", 1)[-1]


def _filter_fn(model_name: str) -> Callable | None:
    arch, _ = split_model_name_tag(model_name)
    return getattr(sys.modules[model_entrypoint(arch).__module__], "checkpoint_filter_fn", None)


def zoo_models(package: str = "dat_smt.") -> List[str]:
    """Registered architectures whose entrypoint lives in ``package`` (by default, every dat-smt backbone)."""
    return sorted(
        name for name in timm.list_models() if model_entrypoint(name).__module__.startswith(package)
    )


def released_variants(models: List[str] | None = None) -> List[str]:
    """Every ``arch.tag`` of ``models`` (default: the zoo) whose cfg has weights (a ``url`` or an ``hf_hub_id``)."""
    names = []
    for arch in models if models is not None else zoo_models():
        for name in timm.list_pretrained(f"{arch}.*"):
            if split_model_name_tag(name)[0] == arch:
                names.append(name)
    return names


def paper_top1(model_name: str) -> float | None:
    """ImageNet-1k top-1 from the paper for a pretrained variant (``None`` if unknown or not a 1k classifier)."""
    cfg = get_pretrained_cfg(model_name)
    if cfg is None or cfg.num_classes != 1000:
        return None
    arch, _ = split_model_name_tag(model_name)
    return PAPER_TOP1.get((arch, cfg.input_size[-1]))


@torch.no_grad()
def count_complexity(model: nn.Module, input_size: Tuple[int, int, int]) -> Dict[str, float]:
    """Parameters (millions) and GMACs (FLOPs / 2, counted by ``torch.utils.flop_counter``) at ``input_size``."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, *input_size))
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    macs = counter.get_total_flops() // 2
    return {"params_m": round(params / 1e6, 2), "gmacs": round(macs / 1e9, 3), "macs": macs}


def hub_config(model: nn.Module, complexity: Mapping[str, float] | None = None) -> Dict[str, Any]:
    """timm's Hub ``config.json`` for ``model`` (``save_config_for_hf``), plus the cached complexity and top-1."""
    import tempfile

    # timm exports only save_for_hf, which also writes the weights; the config half is not re-exported
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, str(path))
        config = json.loads(path.read_text())
    cfg = model.pretrained_cfg
    name = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    if config["num_classes"] in (1000, 21841, 21843, 11821):
        # timm resolves label names from the class count (timm.data.ImageNetInfo / infer_imagenet_subset)
        subset = {1000: "imagenet-1k", 21841: "imagenet-22k", 21843: "imagenet-21k-goog", 11821: "imagenet-12k"}
        config["label_names_source"] = f"timm.data.ImageNetInfo('{subset[config['num_classes']]}')"
    if complexity:
        config["complexity"] = dict(complexity, input_size=list(cfg["input_size"]))
    config["paper_top1"] = paper_top1(name) if is_model(cfg["architecture"]) else None
    return config


def _weight_source(cfg: Mapping[str, Any]) -> str:
    if cfg.get("hf_hub_id"):
        return f"Hugging Face Hub `{cfg['hf_hub_id']}`"
    if cfg.get("url"):
        return f"official release {cfg['url']}, converted by the family's `checkpoint_filter_fn`"
    return "none (random initialisation)"


def model_card(model_name: str, config: Mapping[str, Any], source_cfg: Mapping[str, Any] | None = None) -> str:
    """Model card (Hub ``README.md``) for the pretrained variant ``model_name`` described by ``config``."""
    arch, tag = split_model_name_tag(model_name)
    family = FAMILY_INFO.get(_family(arch), {}) if is_model(arch) else {}
    pcfg = config["pretrained_cfg"]
    repo = hub_repo_id(model_name)
    source_cfg = source_cfg if source_cfg is not None else (get_pretrained_cfg(model_name).to_dict()
                                                            if get_pretrained_cfg(model_name) else {})
    complexity = config.get("complexity", {})
    top1 = config.get("paper_top1")
    size = pcfg["input_size"]
    rows = [
        ("Architecture", f"`{arch}` ({family.get('title', 'dat-smt backbone')})"),
        ("Tag", f"`{tag}`"),
        ("Params (M)", complexity.get("params_m", "n/a")),
        ("GMACs", f"{complexity.get('gmacs', 'n/a')} at {size[1]}x{size[2]}"),
        ("ImageNet-1k top-1 (paper)", f"{top1}" if top1 is not None else "n/a"),
        ("Classes", config["num_classes"]),
        ("Image size", f"{size[1]}x{size[2]}, crop_pct {pcfg.get('crop_pct')}, {pcfg.get('interpolation')}"),
        ("Weights", _weight_source(source_cfg)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    license_ = pcfg.get("license", "other")
    return f"""---
tags:
- image-classification
- timm
- dat-smt
library_name: timm
license: {license_}
datasets:
- imagenet-1k
---
# Model card for {model_name}

{family.get('title', arch)} image classifier, ported to timm by the dat-smt project.
The weights are the official ImageNet weights released by the authors, converted with
`dat-smt convert` (strict key and shape check, reload and forward verified).

| | |
|---|---|
{table}

- Papers: {family.get('papers', 'n/a')}
- Original code: {family.get('code', 'n/a')}
- License: {license_} (the license of the original weights)

## Usage

```python
import timm
import dat_smt  # registers the DAT / DAT++ / SMT models with timm

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
# probabilities = model(transform(image).unsqueeze(0)).softmax(-1)
```

Feature pyramid (strides 4, 8, 16, 32) for detection or segmentation:

```python
backbone = timm.create_model("{arch}", pretrained=True, features_only=True, out_indices=(0, 1, 2, 3))
print(backbone.feature_info.channels(), backbone.feature_info.reduction())
```

Offline: download `model.safetensors` and load it with
`timm.create_model("{arch}", pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors"))`.

## Citation

```bibtex
{family.get('citation', '')}
```
"""


def write_hub_folder(
        model: nn.Module,
        out_dir: Union[str, Path],
        complexity: Mapping[str, float] | None = None,
        weights: bool = True,
) -> Path:
    """Writes a Hub repo folder: ``model.safetensors`` (if ``weights``), ``config.json`` and ``README.md``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.pretrained_cfg
    name = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    config = hub_config(model, complexity)
    if weights:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(name, config, source_cfg=cfg))
    return out_dir


def _shape_signature(arch: str) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(arch).state_dict().items()}


@functools.cache
def _meta_model(arch: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(arch)


def closest_variant(state_dict: Mapping[str, torch.Tensor], candidates: List[str] | None = None) -> Tuple[str, float]:
    """Registered architecture whose state dict best matches ``state_dict`` (keys and shapes), with the match ratio.

    Each candidate is built on the meta device (no memory, no init) and the checkpoint is first passed through the
    candidate family's ``checkpoint_filter_fn``, so official and converted checkpoints are both recognised.
    """
    best, best_score = "", -1.0
    for arch in candidates if candidates is not None else zoo_models():
        try:
            expected = _shape_signature(arch)
            filter_fn = _filter_fn(arch)
            converted = dict(state_dict)
            if filter_fn is not None:
                try:
                    converted = filter_fn(dict(state_dict), _meta_model(arch))
                except Exception:
                    converted = dict(state_dict)
        except Exception:
            continue
        matches = sum(1 for k, v in converted.items() if k in expected and tuple(v.shape) == expected[k])
        score = matches / max(len(expected), len(converted), 1)
        if score > best_score:
            best, best_score = arch, score
    return best, best_score


def convert_checkpoint(
        model_name: str,
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        complexity: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
) -> Dict[str, Any]:
    """Converts an official checkpoint strictly into a Hub repo folder and verifies it by reloading and a forward.

    ``model_kwargs`` (architecture overrides such as a smaller width) are recorded in ``config.json`` as timm's
    ``model_args``, so ``hf-hub:`` rebuilds the same model. Returns a summary (model, files with sizes, parameter
    count, GMACs, max abs difference after reload).
    """
    model_kwargs = dict(model_kwargs or {})
    if not is_model(split_model_name_tag(model_name)[0]):
        raise ValueError(_unknown_model_message(model_name))
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).eval()
    raw = unwrap_state_dict(load_checkpoint(checkpoint))
    filter_fn = _filter_fn(model_name)
    try:
        state_dict = filter_fn(raw, model) if filter_fn is not None else raw
        check_state_dict(state_dict, model, source=str(checkpoint))
    except Exception as e:
        hint = _variant_hint(raw, model_name)
        raise ValueError(f"{checkpoint} cannot be converted to {model_name}: {e}{hint}") from e
    model.load_state_dict(state_dict, strict=True)
    cfg = model.pretrained_cfg
    stats = count_complexity(model, cfg["input_size"]) if complexity else None
    out_dir = write_hub_folder(model, out_dir, complexity=stats)

    reloaded = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out_dir / "model.safetensors")),
        **model_kwargs,
    ).eval()
    x = torch.randn(1, *cfg["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(x) - model(x)).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"reloaded {out_dir} does not reproduce the converted model (max abs diff {diff})")
    return {
        "model": model_name,
        "out_dir": str(out_dir),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gmacs": stats["gmacs"] if stats else None,
        "reload_max_abs_diff": diff,
    }


def _variant_hint(state_dict: Mapping[str, torch.Tensor], model_name: str) -> str:
    arch = split_model_name_tag(model_name)[0]
    try:
        siblings = timm.list_models(module=_family(arch))
        best, score = closest_variant(state_dict, sorted(set(zoo_models()) | set(siblings)))
    except Exception:
        return ""
    if best and best != arch and score > 0.5:
        return f"\nThe checkpoint looks like a `{best}` checkpoint ({score:.0%} of keys and shapes match)."
    return ""


def _unknown_model_message(model_name: str) -> str:
    names = timm.list_models()
    pretrained = timm.list_pretrained()
    close = difflib.get_close_matches(model_name, zoo_models() + pretrained, n=5, cutoff=0.5) or \
        difflib.get_close_matches(model_name, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"Unknown model {model_name!r}.{hint} Import dat_smt before timm.create_model so the zoo is registered; "
            "`dat-smt list` shows every model.")


def _resolved_cfg(model_name: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    if model_name.startswith(("hf-hub:", "hf_hub:")):
        cfg = {"hf_hub_id": model_name.split(":", 1)[1], "source": "hf-hub"}
    else:
        base = get_pretrained_cfg(model_name)
        cfg = base.to_dict() if base is not None else {}
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if any(k in overlay for k in ("file", "hf_hub_id", "url", "state_dict")):
        for key in ("file", "hf_hub_id", "url", "state_dict"):
            cfg.pop(key, None)
    cfg.update(overlay)
    return cfg


def _local_weight_file(cfg: Mapping[str, Any], cache_dir: str | None) -> Path | None:
    """The local file timm read (or would read) for ``cfg``, without using the network."""
    if cfg.get("file"):
        return Path(cfg["file"])
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for filename in (cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir,
                                            local_files_only=True))
            except Exception:
                continue
        return None
    if cfg.get("url"):
        if _has_no_file_name(cfg["url"]):
            return release_cache_file(cfg, cache_dir)
        return _checkpoint_dir(cache_dir) / os.path.basename(urllib.parse.urlparse(cfg["url"]).path)
    return None


def _caused_by(error: BaseException, names: Tuple[str, ...]) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(type(error).__name__ == n or n in [c.__name__ for c in type(error).__mro__] for n in names):
            return error
        error = error.__cause__ or error.__context__
    return None


_NETWORK_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "URLError", "ConnectionError", "ConnectError",
                   "ConnectTimeout", "TimeoutException", "gaierror")
_INCOMPLETE_ERRORS = ("RemoteProtocolError", "IncompleteRead", "ChunkedEncodingError", "ReadError")
_CORRUPT_ERRORS = ("SafetensorError", "UnpicklingError", "EOFError", "HeaderTooLarge", "HeaderTooSmall")


def _how_to_load(arch: str, where: str | None) -> str:
    return (f"Download the weights on a machine with network access ({where}) and load them with "
            f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/weights')).")


def _explain_load_failure(model_name: str, kwargs: Mapping[str, Any], error: BaseException) -> BaseException:
    cfg = _resolved_cfg(model_name, kwargs)
    hub_url = f"https://huggingface.co/{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else None
    where = cfg.get("file") or hub_url or cfg.get("url")
    arch = model_name.split(":", 1)[1].rsplit("/", 1)[-1].split(".")[0] if ":" in model_name else model_name
    how = _how_to_load(arch, where)
    if _caused_by(error, ("RepositoryNotFoundError", "GatedRepoError")):
        return PretrainedWeightsError(
            f"Hub repo {cfg.get('hf_hub_id')!r} for {model_name!r} does not exist or is not accessible. "
            f"dat-smt publishes its weights under https://huggingface.co/{HF_HUB_ORG}; `dat-smt list` shows them.")
    if _caused_by(error, ("RevisionNotFoundError", "RemoteEntryNotFoundError")):
        return PretrainedWeightsError(f"Hub repo {cfg.get('hf_hub_id')!r} has no weights for {model_name!r}: {error}")
    if "Consistency check failed" in str(error) or _caused_by(error, _INCOMPLETE_ERRORS):
        return PretrainedWeightsError(
            f"The download of the weights for {model_name!r} from {where} was incomplete (the connection dropped); "
            f"nothing was added to the cache, so trying again starts afresh. {how}")
    if _caused_by(error, _NETWORK_ERRORS) or isinstance(error, (ConnectionError, TimeoutError)):
        return PretrainedWeightsError(
            f"Cannot download pretrained weights for {model_name!r}: no network (or offline mode is on) and no "
            f"cached copy. {how}")
    local = _local_weight_file(cfg, kwargs.get("cache_dir"))
    mismatch = _caused_by(error, ("ValueError",)) or (
        isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in str(error))
    if _caused_by(error, _CORRUPT_ERRORS) or (
            isinstance(error, RuntimeError) and not mismatch and local is not None and local.is_file()):
        removed = ""
        if local is not None and local.is_file() and not cfg.get("file"):
            blob = local.resolve()  # the Hub cache links snapshots to blobs: drop both, or the blob is re-linked
            local.unlink()  # a corrupt cached download must not shadow a fresh one
            if blob != local.absolute() and blob.is_file():
                blob.unlink()
            removed = " The corrupt cached copy was removed; try again to download it afresh."
        return PretrainedWeightsError(
            f"Pretrained weights for {model_name!r} at {local or where} are corrupt or truncated "
            f"({type(error).__name__}: {error}).{removed} {how}")
    if mismatch:
        hint = ""
        if local is not None and local.is_file():
            try:
                hint = _variant_hint(unwrap_state_dict(load_checkpoint(local)), arch)
            except Exception:
                hint = ""
        return PretrainedWeightsError(
            f"The checkpoint {local or where} does not fit {model_name!r}: {error}{hint}")
    return error


def _checkpoint_dir(cache_dir: Union[str, Path, None]) -> Path:
    """torch.hub's checkpoint cache, where timm keeps ``url`` downloads (``cache_dir`` overrides it, as in timm)."""
    return Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"


def _has_no_file_name(url: str) -> bool:
    return not os.path.basename(urllib.parse.urlparse(url).path)


def release_cache_file(cfg: Mapping[str, Any], cache_dir: Union[str, Path, None] = None) -> Path:
    """Cache path of a release link without a file name: ``<arch>.<tag>-<sha256(url)[:8]>.pth``.

    The url hash keeps copies fetched from different links (a mirror, a re-upload) apart; the name is the same in
    every session, so a finished download is reused.
    """
    digest = hashlib.sha256(cfg["url"].encode()).hexdigest()[:8]
    name = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part) or "weights"
    return _checkpoint_dir(cache_dir) / f"{name}-{digest}.pth"


def _offline() -> bool:
    """Hugging Face's offline switches (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``), which timm users set."""
    import huggingface_hub

    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return huggingface_hub.is_offline_mode() or any(
        (v or "").upper() in ("1", "ON", "YES", "TRUE") for v in values)


_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2 opening torch's pre-1.6 (non-zip) format


def _is_torch_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like a complete ``torch.save`` file (a whole zip archive or the legacy pickle).

    Cloud drives answer an expired or rate-limited share link with an HTML page, which must not enter the cache.
    """
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    return head == _LEGACY_TORCH_MAGIC or zipfile.is_zipfile(path)


def _download_release_file(url: str, target: Path, name: str, how: str) -> None:
    """Streams ``url`` into a ``.partial`` file next to ``target``, moved into place only if complete and valid."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    _logger.info(f"Downloading pretrained weights for {name} from {url} to {target}")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "dat-smt"})
        with urllib.request.urlopen(request, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
            announced = response.headers.get("Content-Length")
        size = partial.stat().st_size
        if announced is not None and size != int(announced):
            raise PretrainedWeightsError(
                f"The download of the weights for {name!r} from {url} was incomplete ({size} of {announced} bytes, "
                f"the connection dropped); nothing was added to the cache, so trying again starts afresh. {how}")
        if not _is_torch_checkpoint(partial):
            raise PretrainedWeightsError(
                f"{url} did not send a PyTorch checkpoint for {name!r} (got {size} bytes starting with "
                f"{partial.read_bytes()[:40]!r}); the link may have expired. Nothing was added to the cache. {how}")
        os.replace(partial, target)
    except urllib.error.HTTPError as e:
        raise PretrainedWeightsError(
            f"Cannot download pretrained weights for {name!r}: {url} answered HTTP {e.code} {e.reason}. {how}") from e
    except http.client.IncompleteRead as e:
        raise PretrainedWeightsError(
            f"The download of the weights for {name!r} from {url} was incomplete (the connection dropped); "
            f"nothing was added to the cache, so trying again starts afresh. {how}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise PretrainedWeightsError(
            f"Cannot download pretrained weights for {name!r}: no network ({e}) and no cached copy. {how}") from e
    finally:
        partial.unlink(missing_ok=True)


def fetch_release_file(cfg: Mapping[str, Any], cache_dir: Union[str, Path, None] = None) -> Path:
    """Local copy of the release file at ``cfg['url']`` in the checkpoint cache (:func:`release_cache_file`).

    A cached copy is reused without network access; one that is no longer a whole checkpoint is removed and
    fetched again. Offline (``HF_HUB_OFFLINE=1``) without a cached copy, or when the download fails, raises
    :class:`PretrainedWeightsError` saying how to get the file; the cache never holds a partial file.
    """
    url = cfg["url"]
    target = release_cache_file(cfg, cache_dir)
    name = target.name.rsplit("-", 1)[0]
    how = _how_to_load(cfg.get("architecture") or name, url) + f" Or place the file at {target} to have it reused."
    if target.is_file():
        if _is_torch_checkpoint(target):
            return target
        _logger.warning(f"Removing {target}: it is not a whole PyTorch checkpoint")
        target.unlink()
    if _offline():
        raise PretrainedWeightsError(
            f"Cannot download pretrained weights for {name!r}: no network (offline mode is on, HF_HUB_OFFLINE) and no "
            f"cached copy. {how}")
    _download_release_file(url, target, name, how)
    return target


def with_release_file(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The family builders' hook: ``kwargs`` for ``build_model_with_cfg``, with release links timm cannot cache.

    timm (through ``torch.hub``) names a ``url`` download after the url's last path component. Share links of cloud
    drives (``https://cloud.tsinghua.edu.cn/f/<id>/?dl=1``) have none, so timm would try to load the cache folder
    itself. Only when ``pretrained`` is set and timm would load from such a ``url`` (no ``state_dict``, ``file`` or
    ``hf_hub_id`` source), the file is fetched with :func:`fetch_release_file` and handed to timm as
    ``pretrained_cfg_overlay=dict(file=...)``; timm then converts it with the family's ``checkpoint_filter_fn`` and
    loads it strictly. Any other ``kwargs`` are returned unchanged.
    """
    if not pretrained:
        return kwargs
    # timm's own resolution (private helper): the weight source priority must be exactly the one it will apply
    from timm.models._builder import _resolve_pretrained_source

    overlay = kwargs.get("pretrained_cfg_overlay")
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    load_from, url = _resolve_pretrained_source(cfg)
    if load_from != "url" or not _has_no_file_name(url):
        return kwargs
    path = fetch_release_file(cfg, kwargs.get("cache_dir"))
    return dict(kwargs, pretrained_cfg_overlay=dict(overlay or {}, file=str(path)))


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names and for weights that are missing, corrupt or wrong.

    Arguments are those of ``timm.create_model``; the weights are loaded by timm itself (strictly, through the
    family's ``checkpoint_filter_fn``; release links without a file name are fetched by the family's builder
    through :func:`with_release_file`). Failures raise :class:`PretrainedWeightsError` (or ``ValueError`` for an
    unknown model name) with the original exception chained.
    """
    if not model_name.startswith(_HUB_PREFIXES) and not is_model(split_model_name_tag(model_name)[0]):
        raise ValueError(_unknown_model_message(model_name))
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except PretrainedWeightsError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        if isinstance(e, RuntimeError) and str(e).startswith("Unknown model"):
            raise ValueError(f"{e}. {_unknown_model_message(str(e).split('(')[-1].rstrip(')'))}") from e
        explained = _explain_load_failure(model_name, kwargs, e)
        if explained is e:
            raise
        raise explained from e
