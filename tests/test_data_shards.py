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
from risgd_data.index import INDEX_VERSION, load_index, split_arrays
from risgd_data.make_shards import make_shards, write_index
from risgd_data.stamps import STAMP_NAME
from risgd_data.synthetic import cifar_like_images, write_cifar_tarball
from risgd_data.tario import write_shard

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
    # no temporary left behind (the stamp file is make_shards' record of the hashes it computed)
    assert not [n for n in os.listdir(digits_dir) if n.startswith(".") and n != STAMP_NAME]


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
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--src" in r.stderr


def test_make_shards_exit_codes(tmp_path):
    # Bad input: one `error:` line, exit 2 (--shard-size 0 used to fall back to the default silently).
    for size in ("0", "-3"):
        r = _run("data.make_shards", "--dataset", "digits", "--out", str(tmp_path / "d"), "--shard-size", size,
                 "--no-progress")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: --shard-size {size} is invalid")
    assert not (tmp_path / "d").exists()
    assert _run("data.make_shards", "--dataset", "nope", "--out", str(tmp_path / "d")).returncode == 2  # argparse
    # The work itself failing (the output directory cannot be created): exit 1, one line, no traceback.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run("data.make_shards", "--dataset", "digits", "--out", str(blocker / "d"), "--no-progress")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
    assert "exit status" in _run("data.make_shards", "--help").stdout.lower()


def test_one_write_path_and_one_index_version():
    data_dir = os.path.join(REPO, "data")
    defs = []
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".py"):
            text = open(os.path.join(data_dir, name)).read()
            # Every file data/ writes goes through risgd_common.atomic (one fsync policy).
            assert "os.replace" not in text and "fsync" not in text and "os.rename" not in text, name
            defs += [name for line in text.splitlines() if line.startswith("INDEX_VERSION =")]
    assert defs == ["index.py"]
    assert INDEX_VERSION == 1


def test_shards_byte_identical_and_failed_writes_leave_nothing(digits_dir, tmp_path):
    # Written through risgd_common.atomic, shards and index.json are byte for byte what they were.
    out = tmp_path / "again"
    make_shards("digits", str(out), shard_size=250, seed=0, progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(digits_dir))
    for name in set(os.listdir(out)) - {STAMP_NAME}:  # the stamps name each file's inode and times
        assert (out / name).read_bytes() == open(os.path.join(digits_dir, name), "rb").read(), name
    # A writer that fails half way leaves the old file and no temporary.
    shard = out / "train-000000.tar"
    before = shard.read_bytes()
    rows = [("k0", b"x" * 10, "png", 0), ("bad.key", b"y", "png", 1)]
    with pytest.raises(DataError, match="bad.key"):
        write_shard(str(shard), iter(rows), 2)
    assert shard.read_bytes() == before
    index_before = (out / "index.json").read_bytes()
    with pytest.raises(TypeError):
        write_index({"version": 1, "junk": object()}, str(out))
    assert (out / "index.json").read_bytes() == index_before
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != STAMP_NAME]
    # A fresh shard records the offsets it wrote.
    rec = write_shard(str(tmp_path / "one.tar"), iter([("a", b"12345", "png", 1), ("b", b"6" * 700, "jpg", 0)]), 2)
    raw = (tmp_path / "one.tar").read_bytes()
    assert [raw[o:o + n] for o, n in zip(rec.offsets, rec.sizes)] == [b"12345", b"6" * 700]
    assert rec.bytes == len(raw) and rec.label_hist == [1, 1]


def test_data_tools_import_no_trainer():
    code = ("import sys, data.make_shards, data.manifest, data.replicate, data.index, data.partition; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('risgd_ext', 'risgd_models', 'risgd_recipes', 'train', 'deepspeed', 'torch')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
