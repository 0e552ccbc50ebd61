"""Fine-tune any timm model (the dat_smt backbones included) on an ImageFolder dataset.

    python examples/finetune_classification.py --data runs/shapes_cls --model smt_tiny --epochs 10
    python examples/finetune_classification.py --data runs/shapes_cls --model test_resnet --epochs 2 \\
        --model-kwargs drop_path_rate=0.0 --output runs/cls
    torchrun --nproc_per_node 2 examples/finetune_classification.py --data runs/shapes_cls ...

``--data`` holds ``train/<class>/*`` and ``val/<class>/*``. Every epoch writes ``last.safetensors`` (weights;
``last_ema.safetensors`` with ``--ema``) and ``last_state.pt`` (weights, optimizer, scheduler, scaler, EMA, epoch,
RNG; loadable with ``torch.load(weights_only=True)``), ``best.safetensors`` when top-1 improves, ``log.csv`` and
``curves.png``. Every file is written to a temporary name and renamed, so a killed run leaves complete files.
``--resume <output>/last_state.pt`` continues from the saved epoch. Under torchrun, DDP uses gloo on CPU and
nccl on GPU; ``--batch-size`` is per process and only rank 0 writes files.
"""
import argparse
import random
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm
from training_common import (
    all_reduce_sum,
    cleanup_distributed,
    load_state,
    parse_kwargs,
    plain_args,
    plot_curves,
    rng_state,
    save_state,
    save_weights,
    set_rng_state,
    setup_distributed,
    write_csv,
)

import dat_smt  # noqa: F401  (registers the backbones with timm)

LOG_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "top1", "top5"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ ImageFolder splits")
    p.add_argument("--model", default="smt_tiny", help="any timm model name")
    p.add_argument("--pretrained", action="store_true", help="start from the pretrained weights (needs network)")
    p.add_argument("--model-kwargs", nargs="*", default=[], help="key=value overrides for timm.create_model")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's); ViT-style models "
                   "may also need --model-kwargs img_size=N")
    p.add_argument("--output", type=Path, default=Path("runs/classification"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    p.add_argument("--sched", default="cosine")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--no-aug", action="store_true", help="no training augmentation")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights and evaluate it too")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="fp16 is GPU only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, default=None, help="a *_state.pt file written by this script")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        p.error("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    if args.accum_steps < 1:
        p.error("--accum-steps must be >= 1")
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            p.error(f"{args.data / split} does not exist; --data must hold train/ and val/ ImageFolder splits")
    return args


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, autocast, progress: bool) -> dict:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = top1 = top5 = count = 0.0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images, labels = images.to(device), labels.to(device)
            with autocast():
                logits = model(images)
            logits = logits.float()
            loss_sum += criterion(logits, labels).item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = ranked == labels[:, None]
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            count += labels.numel()
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], device)
    return {"val_loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    progress = is_main and not args.no_progress
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    train_set = ImageFolder(args.data / "train")
    val_set = ImageFolder(args.data / "val")
    if train_set.classes != val_set.classes:
        raise ValueError(f"train classes {train_set.classes} differ from val classes {val_set.classes}")
    num_classes = len(train_set.classes)
    model_kwargs = parse_kwargs(args.model_kwargs, "--model-kwargs")
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
    model.to(device)

    data_config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size else {},
                                      model=model)
    train_set.transform = create_transform(**data_config, is_training=not args.no_aug)
    val_set.transform = create_transform(**data_config, is_training=False)
    mixup_on = args.mixup > 0 or args.cutmix > 0
    # A DistributedSampler in single-process runs too: N processes then see exactly the global batches of one.
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed,
                                       drop_last=mixup_on)
    val_sampler = DistributedSampler(val_set, shuffle=False) if world_size > 1 else None
    train_loader = DataLoader(train_set, args.batch_size, sampler=train_sampler, num_workers=args.workers,
                              drop_last=mixup_on)
    val_loader = DataLoader(val_set, args.batch_size, sampler=val_sampler, num_workers=args.workers)

    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay)
    updates_per_epoch = max(1, len(train_loader) // args.accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, args.sched, num_epochs=args.epochs,
                                                warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                                updates_per_epoch=updates_per_epoch)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    if mixup_on:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        train_criterion = SoftTargetCrossEntropy()
    else:
        mixup = None
        train_criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()

    start_epoch, best_top1, rows = 0, -1.0, []
    if args.resume is not None:
        state = load_state(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best_top1, rows = state["epoch"] + 1, state["best_top1"], state["log"]
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {args.resume} at epoch {start_epoch}")

    train_model = DistributedDataParallel(model) if world_size > 1 else model
    if is_main:
        args.output.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, num_epochs):
        train_sampler.set_epoch(epoch)
        train_model.train()
        loss_sum = sample_count = 0.0
        num_updates = epoch * updates_per_epoch
        optimizer.zero_grad(set_to_none=True)
        steps = len(train_loader)
        for step, (images, labels) in enumerate(tqdm(train_loader, desc=f"epoch {epoch}", disable=not progress)):
            images, labels = images.to(device), labels.to(device)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            last_in_group = (step + 1) % args.accum_steps == 0 or step + 1 == steps
            sync = nullcontext() if last_in_group or world_size == 1 else train_model.no_sync()
            with sync:
                with autocast():
                    loss = train_criterion(train_model(images), targets)
                scaler.scale(loss / args.accum_steps).backward()
            loss_sum += loss.item() * labels.numel()
            sample_count += labels.numel()
            if last_in_group:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
        scheduler.step(epoch + 1)
        loss_sum, sample_count = all_reduce_sum([loss_sum, sample_count], device)
        metrics = evaluate(model, val_loader, device, autocast, progress)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / sample_count,
               **metrics}
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, device, autocast, progress)
            row.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        rows.append(row)
        if not is_main:
            continue
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if row["top1"] > best_top1:
            best_top1 = row["top1"]
            save_weights(model, args.output / "best.safetensors")
        save_weights(model, args.output / "last.safetensors")
        if ema is not None:
            save_weights(ema.module, args.output / "last_ema.safetensors")
        # The state holds the weights too: one atomic file is a consistent snapshot whenever the run is killed.
        save_state({
            "model": model.state_dict(), "epoch": epoch, "best_top1": best_top1, "log": rows,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(), "args": plain_args(args),
            "classes": train_set.classes,
        }, args.output / "last_state.pt")
        write_csv(rows, args.output / "log.csv", LOG_FIELDS)
        plot_curves(rows, args.output / "curves.png", [
            ("loss", {"train_loss": "train", "val_loss": "val", "ema_val_loss": "val (EMA)"}),
            ("accuracy (%)", {"top1": "top-1", "top5": "top-5", "ema_top1": "top-1 (EMA)"}),
        ])
    cleanup_distributed()


if __name__ == "__main__":
    main()
