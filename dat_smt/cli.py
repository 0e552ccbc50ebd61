"""``dat-smt`` command line: list the zoo, convert official checkpoints, push to the Hub, classify an image."""
import argparse
import json
import sys
from pathlib import Path
from typing import List

import timm
import torch
from timm.models import get_pretrained_cfg

from . import hub

HF_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "hf_configs"


def _cached_complexity(name: str, configs_dir: Path) -> dict:
    path = configs_dir / name / "config.json"
    if path.is_file():
        return json.loads(path.read_text()).get("complexity", {})
    return {}


def cmd_list(args: argparse.Namespace) -> int:
    """Prints the zoo: every released variant with params, GMACs, input size, top-1 and weight source."""
    rows = [("model", "params(M)", "GMACs", "input", "top-1", "weights")]
    for name in hub.released_variants():
        cfg = get_pretrained_cfg(name)
        stats = _cached_complexity(name, Path(args.configs))
        top1 = hub.paper_top1(name)
        source = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "-")
        rows.append((name, str(stats.get("params_m", "?")), str(stats.get("gmacs", "?")),
                     "x".join(map(str, cfg.input_size[1:])), f"{top1}" if top1 else "-", source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    if len(rows) == 1:
        print("(no released variants are registered)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Converts an official checkpoint into a Hub repo folder and prints a summary."""
    model_kwargs = json.loads(args.model_args) if args.model_args else None
    summary = hub.convert_checkpoint(args.model, args.checkpoint, args.out_dir, complexity=not args.no_complexity,
                                     model_kwargs=model_kwargs)
    print(f"converted {summary['model']} -> {summary['out_dir']}")
    print(f"  params: {summary['params_m']} M, GMACs: {summary['gmacs']}")
    print(f"  reload + forward: max abs diff {summary['reload_max_abs_diff']}")
    for name, size in summary["files"].items():
        print(f"  {name}: {size} bytes")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Uploads a repo folder with huggingface_hub (``--dry-run`` only lists the files)."""
    folder = Path(args.out_dir)
    required = ("config.json", "model.safetensors", "README.md")
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a repo folder made by `dat-smt convert`: missing {', '.join(missing)}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    visibility = "private" if args.private else "public"
    print(f"{'would upload' if args.dry_run else 'uploading'} to {args.repo_id} ({visibility}):")
    for p in files:
        print(f"  {p.relative_to(folder)}  {p.stat().st_size} bytes")
    if args.dry_run:
        return 0
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo_id, folder_path=str(folder), commit_message="Add dat-smt weights")
    print(f"done: {info}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classifies one image with the model's own preprocessing and prints the top-k ImageNet labels."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

    overlay = dict(file=args.weights) if args.weights else None
    model = hub.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    image = Image.open(args.image).convert("RGB")
    with torch.no_grad():
        probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
    subset = infer_imagenet_subset(model)
    info = ImageNetInfo(subset) if subset else None
    values, indices = probs.topk(min(args.topk, probs.numel()))
    for p, i in zip(values.tolist(), indices.tolist()):
        label = info.index_to_description(i) if info else f"class {i}"
        print(f"{p:.4f}  {i:5d}  {label}")
    return 0


def cmd_hf_configs(args: argparse.Namespace) -> int:
    """Writes ``<out>/<model>.<tag>/{config.json,README.md}`` for every released variant of the zoo."""
    out = Path(args.out_dir)
    names = args.models or hub.released_variants()
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        stats = _cached_complexity(name, out) if args.reuse_complexity else {}
        if not stats:
            stats = hub.count_complexity(model, model.pretrained_cfg["input_size"])
        hub.write_hub_folder(model, out / name, complexity=stats, weights=False)
        print(f"{name}: {stats['params_m']} M params, {stats['gmacs']} GMACs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dat-smt`` argument parser."""
    parser = argparse.ArgumentParser(prog="dat-smt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the model zoo")
    p.add_argument("--configs", default=str(HF_CONFIGS_DIR), help="hf_configs folder with cached params/GMACs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("convert", help="convert an official checkpoint into a Hub repo folder")
    p.add_argument("model", help="registered model name, e.g. dat_tiny.in1k")
    p.add_argument("checkpoint", help="official checkpoint (.pth) or .safetensors")
    p.add_argument("out_dir")
    p.add_argument("--no-complexity", action="store_true", help="skip counting GMACs")
    p.add_argument("--model-args", help="JSON dict of architecture overrides, recorded in config.json")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push", help="upload a repo folder to the Hugging Face Hub")
    p.add_argument("out_dir")
    p.add_argument("repo_id", help="ORG/REPO")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="only list what would be uploaded")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("predict", help="classify an image")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("--weights", help="local weight file (default: the model's pretrained weights)")
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("hf-configs", help="generate hf_configs/<model>.<tag>/{config.json,README.md}")
    p.add_argument("out_dir", nargs="?", default=str(HF_CONFIGS_DIR))
    p.add_argument("--models", nargs="*", help="only these variants (default: every released variant)")
    p.add_argument("--reuse-complexity", action="store_true", help="keep params/GMACs cached in existing configs")
    p.set_defaults(func=cmd_hf_configs)
    return parser


def main(argv: List[str] | None = None) -> int:
    """Entry point of the ``dat-smt`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, hub.PretrainedWeightsError) as e:
        print(f"dat-smt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
