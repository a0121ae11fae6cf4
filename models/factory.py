"""One entry point for every model a recipe can name."""

from __future__ import annotations

import timm
import torch


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with a one-line error for an unknown name."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}': use resnet8_digits, resnet20_cifar, resnet44_cifar, "
                         "resnet56_cifar or any timm model name (timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
