"""Dataset readers: each turns a source into train/val lists of samples with stable keys.

A sample's key comes from its position in the source's own order (not from the shard shuffle),
so the same image keeps the same key whatever the seed or shard size.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from PIL import Image

from risgd_common.install import need

from .errors import DataError

VAL_FRACTION = 0.2  # digits / split-less ImageFolder: seeded stratified 20% validation split
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}


@dataclass
class Sample:
    key: str
    label: int
    load: Callable[[], tuple[bytes, str]]  # -> (encoded bytes, tar extension)


@dataclass
class Source:
    dataset: str
    num_classes: int
    image_shape: list[int] | None
    classes: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    split_rule: str = ""


def _png(array: np.ndarray) -> tuple[bytes, str]:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue(), "png"


def stratified_split(labels: np.ndarray, seed: int, fraction: float = VAL_FRACTION):
    """Seeded stratified split -> (train_idx, val_idx), each sorted in source order."""
    train_test_split = need("sklearn.model_selection", "a stratified validation split").train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def digits_source(seed: int) -> Source:
    """scikit-learn's embedded digits (1797 8x8 grayscale images, no download)."""
    d = need("sklearn.datasets", "the digits dataset").load_digits()
    # 0..16 intensities -> 0..255 uint8 so the PNG is an ordinary grayscale image.
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(int)
    train, val = stratified_split(labels, seed)
    src = Source("digits", 10, [1, 8, 8], [str(i) for i in range(10)],
                 split_rule=f"seeded stratified {VAL_FRACTION:.0%} validation split (seed {seed})")
    for split, idx in (("train", train), ("val", val)):
        # Key = index in load_digits(): stable whatever the split seed.
        src.splits[split] = [
            Sample(f"digits_{split}_{i:06d}", int(labels[i]), partial(_png, images[i])) for i in idx
        ]
    return src


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays: the official batches need nothing else.

    Security: refusing every other global means a tampered tarball cannot run code during
    conversion (plain pickle.load would import and call anything the file names).
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"CIFAR pickle references {module}.{name}: refusing (not an official batch file)")
        return super().find_class(module, name)


def _load_batch(tar: tarfile.TarFile, member: str, src_path: str) -> dict:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise DataError(f"{member} not found in {src_path}: pass the official CIFAR python tarball as --src")
    try:
        obj = _CifarUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # truncated / not a pickle
        raise DataError(f"cannot read {member} in {src_path} ({e}): re-download the tarball") from None
    if not isinstance(obj, dict):
        raise DataError(f"{member} in {src_path} is not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_source(path: str, dataset: str) -> Source:
    """Official cifar-10-python.tar.gz / cifar-100-python.tar.gz; pickles read from inside only."""
    if dataset == "cifar10":
        root, train_files, test_file, label_key, meta, names_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
            "labels", "batches.meta", "label_names")
    else:
        root, train_files, test_file, label_key, meta, names_key = (
            "cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names")
    if not os.path.isfile(path):
        raise DataError(f"--src {path} is not a file: pass the official {dataset} python tarball")
    with tarfile.open(path, mode="r:*") as tar:
        parts = {}
        for split, files in (("train", train_files), ("val", [test_file])):
            batches = [_load_batch(tar, f"{root}/{f}", path) for f in files]
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            parts[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in _load_batch(tar, f"{root}/{meta}", path)[names_key]]
    src = Source(dataset, len(names), [3, 32, 32], names, split_rule="official train / test batches")
    for split, (images, labels) in parts.items():
        src.splits[split] = [
            Sample(f"{dataset}_{split}_{i:06d}", int(labels[i]),
                   partial(_png, np.ascontiguousarray(images[i])))
            for i in range(len(labels))
        ]
    return src


def _read_image_file(path: str) -> tuple[bytes, str]:
    """JPEG and PNG bytes are kept as they are (no re-encoding); other formats become PNG."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:3] == b"\xff\xd8\xff":
        return raw, "jpg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return raw, "png"
    with Image.open(io.BytesIO(raw)) as im:
        return _png(np.asarray(im.convert("RGB")))


def _class_dirs(root: str) -> list[str]:
    return sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def _files(root: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                paths.append(os.path.join(d, name))
                labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


def imagefolder_source(root: str, dataset: str, seed: int) -> Source:
    """ROOT/train/CLASS/* and ROOT/val/CLASS/* (ImageNet after valprep), or ROOT/CLASS/* split 80/20.

    Class indices are the sorted class directory names of the training split (torchvision's
    ImageFolder convention), so val uses the same mapping.
    """
    if not os.path.isdir(root):
        raise DataError(f"--src {root} is not a directory: pass the {dataset} root")
    has_splits = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))
    if dataset == "imagenet" and not has_splits:
        raise DataError(f"--src {root} lacks train/ and val/: use the ILSVRC-2012 layout (val after valprep)")
    classes = _class_dirs(os.path.join(root, "train") if has_splits else root)
    if not classes:
        raise DataError(f"no class directories under {root}: expected CLASS/IMAGE files")
    src = Source(dataset, len(classes), None, classes)
    if has_splits:
        src.split_rule = "train/ and val/ directories"
        lists = {s: _files(os.path.join(root, s), classes) for s in ("train", "val")}
    else:
        src.split_rule = f"seeded stratified {VAL_FRACTION:.0%} validation split (seed {seed})"
        paths, labels = _files(root, classes)
        train, val = stratified_split(labels, seed)
        lists = {
            "train": ([paths[i] for i in train], labels[train]),
            "val": ([paths[i] for i in val], labels[val]),
        }
    for split, (paths, labels) in lists.items():
        src.splits[split] = [
            Sample(f"{dataset}_{split}_{i:08d}", int(lab), partial(_read_image_file, p))
            for i, (p, lab) in enumerate(zip(paths, labels))
        ]
    return src


def open_source(dataset: str, src: str | None, seed: int) -> Source:
    if dataset == "digits":
        return digits_source(seed)
    if src is None:
        raise DataError(f"--src is required for --dataset {dataset}")
    if dataset in ("cifar10", "cifar100"):
        return cifar_source(src, dataset)
    if dataset in ("imagefolder", "imagenet"):
        return imagefolder_source(src, dataset, seed)
    raise DataError(f"unknown --dataset {dataset}: choose digits, cifar10, cifar100, imagefolder, imagenet")
