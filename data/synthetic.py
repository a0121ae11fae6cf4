"""Small synthetic sources in the real on-disk formats, for tests and benchmarks (no downloads).

`write_cifar_tarball` writes a tarball laid out exactly like the official cifar-10-python.tar.gz /
cifar-100-python.tar.gz (protocol-2 pickles of dicts with bytes keys), so the CIFAR converter is
exercised on the real format. `write_imagenet_tree` writes an ILSVRC-2012-layout tree of seeded,
photo-like JPEGs of ImageNet's pixel and file sizes (~500x375, ~85 KB), for the ImageNet benchmark.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from typing import BinaryIO

import numpy as np

from risgd_common.atomic import atomic_write, write_bytes_atomic


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


# ---------------------------------------------------------------- ImageNet-like JPEG trees

IMAGENET_MEAN_JPEG_KB = 85  # the target: ImageNet train JPEGs are ~110 KB on average, ~85 KB at q=90 here
_ASPECTS = (4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)  # ImageNet's common shapes, 4:3 most often


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) distributed like ImageNet's: long side 500 for most images (otherwise
    320-499), 4:3 most often, a quarter of them portrait; mean about 470 x 370."""
    long = 500 if rng.random() < 0.8 else int(rng.integers(320, 500))
    short = int(round(long / _ASPECTS[int(rng.integers(len(_ASPECTS)))]))
    return (long, short) if rng.random() < 0.75 else (short, long)


def _power_law_field(w: int, h: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """h x w x 3 float32 colour noise with a 1/f^alpha power spectrum (natural images: alpha ~ 2),
    channels mixed so that luminance dominates as in photos; unit standard deviation."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    mag = f ** np.float32(-alpha / 2)
    mag[0, 0] = 0.0
    spec = (rng.standard_normal((*mag.shape, 3), dtype=np.float32)
            + 1j * rng.standard_normal((*mag.shape, 3), dtype=np.float32)) * mag[..., None]
    field = np.fft.irfft2(spec, s=(h, w), axes=(0, 1)).astype(np.float32)
    field /= field.std() + 1e-12
    mix = (0.3 * np.eye(3) + 0.7 * rng.normal(1.0, 0.15, (1, 3))).astype(np.float32)
    return field @ mix.T


def photo_like_image(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """h x w x 3 uint8 'photo': a 1/f^alpha textured background with a few textured objects (hard
    edges, occlusion). alpha is drawn per image, which spreads the JPEG sizes as real photos do."""
    from PIL import Image, ImageDraw

    alpha = rng.uniform(2.0, 2.8)
    img = 110 + 38 * _power_law_field(w, h, rng, alpha) + rng.normal(0, 30, 3).astype(np.float32)
    fg = 110 + 38 * _power_law_field(w, h, rng, alpha + 0.2) + rng.normal(0, 50, 3).astype(np.float32)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.3, 2) * (w + h) / 2
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255
    return np.clip(img * (1 - m) + fg * m, 0, 255).astype(np.uint8)


def imagenet_like_jpeg(seed: list[int] | int, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    """One JPEG of ImageNet's size and file size (~85 KB at ~500x375, 4:2:0), a pure function of `seed`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size or imagenet_like_size(rng)
    buf = io.BytesIO()
    Image.fromarray(photo_like_image(w, h, rng)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _wnids(classes: int, seed: int) -> list[str]:
    ids = np.random.default_rng([seed, 0x1D]).choice(10**8, size=classes, replace=False)
    return sorted(f"n{int(i):08d}" for i in ids)


def _write_one(job: tuple[str, list[int], int]) -> int:
    path, seed, quality = job
    if os.path.exists(path):  # written atomically, so an existing file is complete: resume
        return os.path.getsize(path)
    data = imagenet_like_jpeg(seed, quality)
    write_bytes_atomic(path, data)
    return len(data)


def write_imagenet_tree(root: str, n_train: int, n_val: int, classes: int = 10, seed: int = 0,
                        quality: int = 90, workers: int = 1) -> dict:
    """Write an ILSVRC-2012-layout tree of synthetic photo-like JPEGs (no download):
    ROOT/train/WNID/WNID_I.JPEG and ROOT/val/WNID/ILSVRC2012_val_I.JPEG (val after valprep),
    `n_train` / `n_val` images dealt round-robin over `classes` wnid-like class names.

    Every image is a pure function of (seed, split, i), written atomically, so the tree is
    reproducible, a re-run only writes what is missing, and `workers` processes give the same files.
    Returns {"images", "bytes", "mean_kb", "classes"}.
    """
    if n_train < classes or n_val < 0 or classes < 1:
        raise ValueError(f"need n_train >= classes >= 1 and n_val >= 0, got {n_train}, {n_val}, {classes}")
    wnids = _wnids(classes, seed)
    jobs = []
    for s, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for i in range(n):
            cls = wnids[i % classes]
            name = f"{cls}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            jobs.append((os.path.join(root, split, cls, name), [seed, s, i, 0x1A], quality))
    for split in ("train", "val"):
        for cls in wnids:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=8)
    else:
        sizes = [_write_one(j) for j in jobs]
    total = int(sum(sizes))
    return {"images": len(jobs), "bytes": total, "mean_kb": total / max(1, len(jobs)) / 1e3, "classes": wnids}
