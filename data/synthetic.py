"""Small synthetic sources in the real on-disk formats, for tests and benchmarks (no downloads).

`write_cifar_tarball` writes a tarball laid out exactly like the official cifar-10-python.tar.gz /
cifar-100-python.tar.gz (protocol-2 pickles of dicts with bytes keys), so the CIFAR converter is
exercised on the real format.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from typing import BinaryIO

import numpy as np

from risgd_common.atomic import atomic_write


def cifar_like_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """n x 32 x 32 x 3 uint8: smooth blobs plus noise, so PNG sizes resemble real photos'."""
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    return np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)


def _add(tar: tarfile.TarFile, name: str, obj: object) -> None:
    data = pickle.dumps(obj, protocol=2)
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes, name: str) -> dict:
    # Official layout: data is N x 3072 uint8, channel-major (1024 R, 1024 G, 1024 B) per row.
    return {
        b"batch_label": name.encode(),
        label_key: labels.tolist(),
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }


def write_cifar_tarball(path: str, dataset: str = "cifar10", n_train: int = 50, n_test: int = 20,
                        seed: int = 0) -> str:
    """Write a CIFAR-format python tarball with random images (atomically); returns `path`."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    train_x, test_x = cifar_like_images(n_train, rng), cifar_like_images(n_test, rng)
    train_y = rng.integers(0, classes, n_train)
    test_y = rng.integers(0, classes, n_test)

    def writer(f: BinaryIO) -> None:
        # name=path: the gzip header records the real file name, not the temporary one.
        with tarfile.open(name=path, mode="w:gz", fileobj=f) as tar:
            if dataset == "cifar10":
                root = "cifar-10-batches-py"
                for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
                    _add(tar, f"{root}/data_batch_{i}",
                         _batch(train_x[part], train_y[part], b"labels", f"training batch {i} of 5"))
                _add(tar, f"{root}/test_batch", _batch(test_x, test_y, b"labels", "testing batch 1 of 1"))
                _add(tar, f"{root}/batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
            else:
                root = "cifar-100-python"
                _add(tar, f"{root}/train", _batch(train_x, train_y, b"fine_labels", "training batch 1 of 1"))
                _add(tar, f"{root}/test", _batch(test_x, test_y, b"fine_labels", "testing batch 1 of 1"))
                _add(tar, f"{root}/meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})

    atomic_write(path, writer)
    return path
