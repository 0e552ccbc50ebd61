"""Helpers shared by the fine-tuning scripts: distributed setup, crash-safe checkpoints, CSV logs and curve plots.

The scripts import it as a sibling module (``python examples/x.py`` and ``torchrun examples/x.py`` both put
``examples/`` first on ``sys.path``).
"""
import ast
import csv
import datetime
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib
import torch
import torch.distributed as dist
from safetensors.torch import save_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def parse_kwargs(items: Sequence[str], flag: str) -> dict:
    """``["d_model=64", "depths=[1,1]", "act=gelu"]`` -> dict; values are Python literals (other text stays str)."""
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def setup_distributed(device: str, timeout: datetime.timedelta | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun joins the process group (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device(device)
    use_cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), world_size, torch.device("cuda", local_rank)
    return dist.get_rank(), world_size, torch.device("cpu")


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums ``values`` over all ranks (identity in a single process)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` and moves it onto ``path`` once written.

    A reader (or a resumed run after a kill) sees either the previous complete file or the new complete one.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically writes a module's weights as safetensors; tied weights are stored once
    (read back with ``safetensors.torch.load_model``)."""
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=metadata)


def save_state(state: dict, path: Path) -> None:
    """Atomically writes a training state that ``torch.load(path, weights_only=True)`` reads back."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def plain_args(args) -> dict:
    """``vars(args)`` with paths as strings, storable in a weights-only checkpoint."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_csv(rows: Sequence[dict], path: Path, first_fields: Sequence[str] = ()) -> None:
    """Writes ``rows`` atomically; columns are ``first_fields`` then any other keys in order of appearance."""
    fields = list(first_fields)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


def plot_curves(rows: Sequence[dict], path: Path, panels: Sequence[tuple[str, dict[str, str]]]) -> None:
    """One subplot per ``(y label, {row key: legend label})`` panel, against ``epoch``; missing keys are skipped."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for key, label in curves.items():
            if all(key in r for r in rows):
                ax.plot(epochs, [r[key] for r in rows], marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
