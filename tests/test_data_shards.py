"""Shard writer: real tar shards from digits, CIFAR-format tarballs, ImageFolder and ImageNet layouts."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from risgd_data.errors import DataError
from risgd_data.index import load_index, split_arrays
from risgd_data.make_shards import make_shards
from risgd_data.synthetic import cifar_like_images, write_cifar_tarball

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_digits_index(digits_dir):
    ix = load_index(digits_dir)
    assert ix["version"] == 1 and ix["dataset"] == "digits" and ix["num_classes"] == 10
    assert ix["image_shape"] == [1, 8, 8]
    tr, va = ix["splits"]["train"], ix["splits"]["val"]
    assert tr["samples"] + va["samples"] == 1797 and va["samples"] == 360  # seeded stratified 20%
    assert len(tr["shards"]) == 6  # several shards, so p=4 spans more than one
    for split in (tr, va):
        assert sum(s["samples"] for s in split["shards"]) == split["samples"]
        for s in split["shards"]:
            path = os.path.join(digits_dir, s["name"])
            assert os.path.getsize(path) == s["bytes"]
            assert sum(s["label_hist"]) == s["samples"] == len(s["labels"]) == len(s["offsets"])
            assert np.bincount(s["labels"], minlength=10).tolist() == s["label_hist"]
    # Stratified: every class is about 20% validation.
    val_hist = np.sum([s["label_hist"] for s in va["shards"]], axis=0)
    all_hist = val_hist + np.sum([s["label_hist"] for s in tr["shards"]], axis=0)
    assert np.all(np.abs(val_hist / all_hist - 0.2) < 0.02)
    assert not [n for n in os.listdir(digits_dir) if n.endswith(".tmp")]


def test_readable_by_webdataset_and_tar(digits_dir):
    ix = load_index(digits_dir)
    shard = ix["splits"]["train"]["shards"][1]
    path = os.path.join(digits_dir, shard["name"])
    names = subprocess.run(["tar", "-tf", path], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 2 * shard["samples"]
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "cls"}
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert len(samples) == shard["samples"]
    raw = open(path, "rb").read()
    for s, label, off, size in zip(samples, shard["labels"], shard["offsets"], shard["sizes"]):
        assert s["__key__"].startswith("digits_train_")
        assert int(s["cls"]) == label
        assert raw[off:off + size] == s["png"]  # recorded offsets address the image member
    img = Image.open(io.BytesIO(samples[0]["png"]))
    assert img.size == (8, 8) and img.mode == "L"


def test_rerun_skips_and_is_deterministic(tmp_path):
    out = str(tmp_path / "d")
    a = make_shards("digits", out, shard_size=400, progress=False)
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    # Truncate one shard: the re-run must rewrite exactly that one, to identical bytes.
    victim = os.path.join(out, "train-000001.tar")
    with open(victim, "r+b") as f:
        f.truncate(1000)
    b = make_shards("digits", out, shard_size=400, progress=False)
    assert a["splits"] == b["splits"]
    for name, t in mtimes.items():
        changed = os.stat(os.path.join(out, name)).st_mtime_ns != t
        assert changed == (name == "train-000001.tar"), name
    # Keys come from the source order: another shuffle seed permutes, never renames.
    c = make_shards("digits", str(tmp_path / "e"), shard_size=400, seed=1, progress=False)
    first_keys = [{s["first_key"] for s in ix["splits"]["train"]["shards"]} for ix in (a, c)]
    assert first_keys[0] != first_keys[1]
    ka = {k for s in a["splits"]["train"]["shards"] for k in (s["first_key"], s["last_key"])}
    assert all(k.startswith("digits_train_") and k[-6:].isdigit() for k in ka)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_tarball(tmp_path, dataset):
    tgz = write_cifar_tarball(str(tmp_path / f"{dataset}.tar.gz"), dataset, n_train=30, n_test=10, seed=3)
    ix = make_shards(dataset, str(tmp_path / "s"), src=tgz, shard_size=8, progress=False)
    assert ix["num_classes"] == (10 if dataset == "cifar10" else 100)
    assert ix["image_shape"] == [3, 32, 32]
    assert ix["splits"]["train"]["samples"] == 30 and ix["splits"]["val"]["samples"] == 10
    # Pixels survive the round trip: decode a sample and compare with the generator's image.
    rng = np.random.default_rng(3)
    train_x = cifar_like_images(30, rng)
    shard = ix["splits"]["train"]["shards"][0]
    samples = list(wds.WebDataset(str(tmp_path / "s" / shard["name"]), shardshuffle=False).decode("rgb8"))
    for s in samples:
        i = int(s["__key__"].rsplit("_", 1)[1])
        assert np.array_equal(s["png"], train_x[i])


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_foreign_pickles(tmp_path):
    marker = tmp_path / "pwned"
    tgz = tmp_path / "evil.tar.gz"
    data = pickle.dumps({b"data": _Evil(str(marker)), b"labels": [0]}, protocol=2)
    with tarfile.open(tgz, "w:gz") as tar:
        ti = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(DataError, match="refusing"):
        make_shards("cifar10", str(tmp_path / "s"), src=str(tgz), progress=False)
    assert not marker.exists()


def _write_images(root, classes: dict[str, int], rng, fmt_cycle=("PNG", "JPEG")) -> list[bytes]:
    raw = []
    for cls, n in classes.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            fmt = fmt_cycle[i % len(fmt_cycle)]
            name = f"{cls}_{i}.{'JPEG' if fmt == 'JPEG' else 'png'}"
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / cls / name, fmt)
            raw.append((root / cls / name).read_bytes())
    return raw


def _members(shard_dir: str) -> list[bytes]:
    out = []
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tar:
                out += [tar.extractfile(m).read() for m in tar if not m.name.endswith(".cls")]
    return out


def test_imagefolder_keeps_original_bytes(tmp_path):
    raw = _write_images(tmp_path / "src", {"cat": 5, "dog": 5}, np.random.default_rng(0))
    ix = make_shards("imagefolder", str(tmp_path / "s"), src=str(tmp_path / "src"), shard_size=3,
                     progress=False)
    assert ix["classes"] == ["cat", "dog"] and ix["image_shape"] is None
    assert ix["splits"]["train"]["samples"] == 8 and ix["splits"]["val"]["samples"] == 2  # 80/20 stratified
    assert sorted(_members(str(tmp_path / "s"))) == sorted(raw)  # JPEG and PNG bytes not re-encoded
    names = subprocess.run(["tar", "-tf", str(tmp_path / "s" / "train-000000.tar")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert {n.rsplit(".", 1)[1] for n in names} <= {"jpg", "png", "cls"}


def test_imagenet_layout(tmp_path):
    rng = np.random.default_rng(1)
    wnids = ["n01440764", "n01443537", "n01484850"]
    _write_images(tmp_path / "in" / "train", dict.fromkeys(wnids, 3), rng, ("JPEG",))
    _write_images(tmp_path / "in" / "val", dict.fromkeys(wnids, 2), rng, ("JPEG",))
    ix = make_shards("imagenet", str(tmp_path / "s"), src=str(tmp_path / "in"), progress=False)
    assert ix["classes"] == wnids and ix["num_classes"] == 3
    assert ix["splits"]["train"]["samples"] == 9 and ix["splits"]["val"]["samples"] == 6
    val = split_arrays(ix, "val")
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    with pytest.raises(DataError, match="train/ and val/"):
        make_shards("imagenet", str(tmp_path / "t"), src=str(tmp_path / "in" / "train"), progress=False)


def test_make_shards_cli(tmp_path):
    r = _run("data.make_shards", "--help")
    assert r.returncode == 0 and "--shard-size" in r.stdout
    r = _run("data.make_shards", "--dataset", "digits", "--out", str(tmp_path / "d"), "--shard-size", "500",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "d" / "index.json"))["splits"]["train"]["samples"] == 1437
    r = _run("data.make_shards", "--dataset", "cifar10", "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--src" in r.stderr
