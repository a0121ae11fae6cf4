"""Train / eval transforms per dataset (PIL image in, normalized float tensor out).

The randomness these draw comes from Python's `random` (timm) and torch's global generator
(torchvision); the loader reseeds both per sample from (seed, rank, step, position), which is what
makes augmented batches reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)  # load_digits pixels / 16
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TIMM_DATASETS = ("imagenet", "imagefolder")


def image_mode(dataset: str) -> str:
    """PIL mode the loader converts decoded images to before the transform."""
    return "L" if dataset == "digits" else "RGB"


def _check(dataset: str) -> None:
    if dataset not in ("digits", *CIFAR_STATS, *TIMM_DATASETS):
        raise ValueError(f"no transforms for dataset {dataset!r}")


def train_transform(dataset: str, image_size: int | None = None) -> Callable:
    """digits: none; CIFAR: pad 4 + random crop 32 + flip; ImageNet/imagefolder: timm RRC + flip."""
    _check(dataset)
    if dataset == "digits":
        return eval_transform(dataset, image_size)
    if dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[dataset]
        size = image_size or 32
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    from timm.data import create_transform

    return create_transform(image_size or 224, is_training=True)


def eval_transform(dataset: str, image_size: int | None = None) -> Callable:
    """digits / CIFAR: normalize only; ImageNet/imagefolder: timm resize + center crop."""
    _check(dataset)
    if dataset == "digits":
        resize = [T.Resize(image_size)] if image_size else []
        return T.Compose([*resize, T.ToTensor(), T.Normalize(DIGITS_MEAN, DIGITS_STD)])
    if dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[dataset]
        resize = [T.Resize(image_size)] if image_size and image_size != 32 else []
        return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform

    return create_transform(image_size or 224, is_training=False)
