"""ResNet v1 for 32x32 images (He et al. 2016, section 4.2): depth 6n+2, widths 16-32-64.

timm's ResNet always has an ImageNet stem (stride-2 7x7 conv and max-pool) and four stages, so the
paper's CIFAR models are defined here and registered with timm. Shortcuts use the parameter-free
option A (subsample and zero-pad channels), which gives the published parameter counts
(ResNet-20: 0.27M) and accuracies (91.25% on CIFAR-10).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: int = 16,
                 drop_rate: float = 0.0, **_: object):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.num_features, self.drop_rate = num_classes, 4 * width, drop_rate
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, planes = [], width
        for stage, out_planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(planes, out_planes, 2 if stage > 0 and i == 0 else 1))
                planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(F.dropout(x, self.drop_rate, self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(input_size: tuple[int, int, int]) -> dict:
    return {"url": "", "num_classes": 10, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1", "classifier": "fc"}


def _create(variant: str, depth: int, pretrained: bool, input_size=(3, 32, 32), **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights: pass pretrained=False")
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or _cfg(input_size)  # timm.create_model passes None
    return build_model_with_cfg(CifarResNet, variant, pretrained=False, pretrained_cfg=pretrained_cfg,
                                depth=depth, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet8_digits(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The CPU-sized default: ResNet-8 on 1x8x8 digit images."""
    kwargs.setdefault("in_chans", 1)
    return _create("resnet8_digits", 8, pretrained, input_size=(1, 8, 8), **kwargs)
