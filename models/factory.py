"""One entry point for every model a recipe can name."""

from __future__ import annotations

import timm
import torch


def check_model(name: str) -> None:
    """Refuse a model name neither timm nor risgd_models registered (one line, ValueError)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}': use resnet8_digits, resnet20_cifar, resnet44_cifar, "
                         "resnet56_cifar or any timm model name (timm.list_models())")


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with a one-line error for an unknown name."""
    check_model(name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def model_bytes(name: str) -> int:
    """fp32 bytes one round averages for model ``name``: parameters plus floating-point buffers
    (BatchNorm statistics), at the model's default head, 4 bytes per element.

    The number ``python -m risgd_planner --model-bytes N`` takes for a model timm alone does
    not know (the CIFAR ResNets registered here).
    """
    check_model(name)
    model = timm.create_model(name, pretrained=False)
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return 4 * sum(t.numel() for t in tensors)
