"""Test-set accuracy of the averaged model, computed by every rank on its slice of the test set.

Each rank counts top-1 and top-5 hits and samples over its contiguous slice
(``make_eval_loader(..., rank=r, world_size=p)``); one all_reduce of three integers sums them, so
the accuracy is exactly that of one process evaluating the whole set, in 1/p of the time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_classes: int,
             channels_last: bool = False, reduce: bool = True) -> dict:
    """Accuracy of the (averaged) model on the whole test set: each rank counts its slice, the counts
    are summed over ranks, so the result is exactly that of one process evaluating everything.
    ``reduce=False``: this process's loader holds the whole set; no collective."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        top = model(images).topk(min(5, num_classes), dim=1).indices
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(labels.numel(), device=device)])
    model.train()
    if reduce and dist.is_initialized():
        dist.all_reduce(counts)
    correct1, correct5, total = (int(c) for c in counts.tolist())
    out = {"test_acc": 100.0 * correct1 / max(1, total)}
    if num_classes > 10:  # top-5 says little with 10 classes
        out["test_acc5"] = 100.0 * correct5 / max(1, total)
    return out
