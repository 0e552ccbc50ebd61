"""The seeded training loop shared by the slow "detector fits the shapes" tests."""
import torch


def train_on_batches(model, data, steps: int, lr: float, lr_drop: int | None = None) -> list[float]:
    """Trains ``model`` on ``steps`` batches of 4 ``(image, target)`` pairs of ``data`` drawn with a generator
    seeded 0: AdamW (weight decay 1e-4) and gradient clipping at 0.1 as the official DETR-family recipes, the
    learning rate times 0.1 from step ``lr_drop`` on if given. Returns the loss of every step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [] if lr_drop is None else [lr_drop], 0.1)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        batch = [data[i] for i in torch.randint(0, len(data), (4,), generator=generator).tolist()]
        loss = sum(model([image for image, _ in batch], [target for _, target in batch]).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses
