"""ImageNet conversion: the synthetic ImageNet-layout generator, parallel make_shards (byte-identical
to one process, resumable, atomic), the CLI's throughput lines, and pre-sized shards (--max-side)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from risgd_data.errors import DataError
from risgd_data.make_shards import make_shards
from risgd_data.stamps import STAMP_NAME
from risgd_data.synthetic import imagenet_like_jpeg, write_imagenet_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tree") / "in")
    write_imagenet_tree(root, 30, 6, classes=3, seed=0)
    return root


def _files(d: str) -> dict[str, bytes]:
    """Every shard and index.json; not the verification stamps, which record inodes and mtimes."""
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n != STAMP_NAME}


def test_generator_layout_sizes_and_determinism(tree, tmp_path):
    classes = sorted(os.listdir(os.path.join(tree, "train")))
    assert len(classes) == 3 and all(c.startswith("n") and len(c) == 9 for c in classes)
    assert sorted(os.listdir(os.path.join(tree, "val"))) == classes
    train = [os.path.join(tree, "train", c, n) for c in classes for n in os.listdir(os.path.join(tree, "train", c))]
    val = [os.path.join(tree, "val", c, n) for c in classes for n in os.listdir(os.path.join(tree, "val", c))]
    assert len(train) == 30 and len(val) == 6 and all(p.endswith(".JPEG") for p in train + val)
    sizes = np.array([os.path.getsize(p) for p in train])
    dims = []
    for p in train:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            dims.append(im.size)
    # ImageNet-like: ~500x375 on average (long side <= 500), ~85 KB, spread like photos'.
    assert 60e3 < sizes.mean() < 115e3 and sizes.std() > 8e3
    assert max(max(d) for d in dims) == 500 and 330 < np.mean([w * h for w, h in dims]) ** 0.5 < 470
    assert len(set(dims)) > 1
    # A pure function of the seed: the same bytes again, and a re-run keeps what exists.
    first = os.path.join(tree, "train", classes[0], f"{classes[0]}_0.JPEG")
    assert imagenet_like_jpeg([0, 0, 0, 0x1A]) == open(first, "rb").read()
    again = str(tmp_path / "again")
    write_imagenet_tree(again, 30, 6, classes=3, seed=0, workers=2)
    for split in ("train", "val"):
        for c in classes:
            assert _files(os.path.join(tree, split, c)) == _files(os.path.join(again, split, c))
    mtime = os.stat(train[0]).st_mtime_ns
    write_imagenet_tree(tree, 30, 6, classes=3, seed=0)
    assert os.stat(train[0]).st_mtime_ns == mtime
    with pytest.raises(ValueError):
        write_imagenet_tree(again, 2, 0, classes=3)


def test_parallel_conversion_is_byte_identical_and_resumable(tree, tmp_path):
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    rep1, rep2 = {}, {}
    a = make_shards("imagenet", one, src=tree, shard_size=4, progress=False, workers=1, report=rep1)
    b = make_shards("imagenet", two, src=tree, shard_size=4, progress=False, workers=2, report=rep2)
    assert a == b and _files(one) == _files(two)  # every shard and index.json, byte for byte
    assert len(a["splits"]["train"]["shards"]) == 8 and len(a["splits"]["val"]["shards"]) == 2
    assert rep1["written"] == rep2["written"] == 36 and rep2["workers"] == 2 and rep2["kept"] == 0
    assert rep2["busy_seconds"] > 0 and 0 < rep2["convert_seconds"] <= rep2["seconds"]
    # Resume: a truncated shard and a missing one are rewritten, every other shard is kept as it is.
    mtimes = {n: os.stat(os.path.join(two, n)).st_mtime_ns for n in os.listdir(two) if n.endswith(".tar")}
    os.truncate(os.path.join(two, "train-000003.tar"), 700)
    os.remove(os.path.join(two, "val-000001.tar"))
    rep = {}
    make_shards("imagenet", two, src=tree, shard_size=4, progress=False, workers=2, report=rep)
    assert _files(one) == _files(two)
    assert rep["written"] == 4 + 2 and rep["kept"] == 30
    for name, t in mtimes.items():
        rewritten = name in ("train-000003.tar", "val-000001.tar")
        assert (os.stat(os.path.join(two, name)).st_mtime_ns != t) == rewritten, name
    assert not [n for n in os.listdir(two) if n.startswith(".") and n != STAMP_NAME]  # no temporary left behind
    with pytest.raises(DataError, match="--workers 0"):
        make_shards("imagenet", two, src=tree, workers=0, progress=False)


def test_a_failing_worker_leaves_complete_shards_only(tree, tmp_path):
    """A source image that cannot be read fails its shard's worker: the run fails with the OS error
    and writes no index.json; every shard on disk is complete (no temporary, no half shard), and
    the re-run keeps them and ends byte-identical to a clean run."""
    ref = str(tmp_path / "ref")
    make_shards("imagenet", ref, src=tree, shard_size=4, progress=False)
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", tree, str(src)], check=True)
    victim = sorted((src / "train").rglob("*.JPEG"))[17]
    saved = victim.read_bytes()
    victim.unlink()
    victim.mkdir()  # still listed as an image, but opening it fails, also as root
    out = str(tmp_path / "s")
    with pytest.raises(OSError):
        make_shards("imagenet", out, src=str(src), shard_size=4, progress=False, workers=2)
    names = os.listdir(out)
    assert "index.json" not in names and not [n for n in names if n.startswith(".")]
    assert 0 < len(names) < 10
    for n in names:  # whatever was written is a whole shard, byte-identical to the clean run's
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(ref, n), "rb").read(), n
    victim.rmdir()
    victim.write_bytes(saved)
    rep = {}
    make_shards("imagenet", out, src=str(src), shard_size=4, progress=False, workers=2, report=rep)
    index = json.load(open(os.path.join(ref, "index.json")))
    samples = {sh["name"]: sh["samples"] for split in index["splits"].values() for sh in split["shards"]}
    assert _files(out) == _files(ref) and rep["kept"] == sum(samples[n] for n in names)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.make_shards", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_workers_rates_and_estimate(tree, tmp_path):
    r = _run("--help")
    assert r.returncode == 0 and "--workers" in r.stdout
    r = _run("--dataset", "imagenet", "--src", tree, "--out", str(tmp_path / "s"), "--shard-size", "6",
             "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "train: 30 samples in 5 shards" in out and "with 2 worker process(es)" in out
    assert "img/s total" in out and "img/s per process" in out
    assert "estimate for full ImageNet-1k (1,331,167 images" in out and " min " in out
    r = _run("--dataset", "imagenet", "--src", tree, "--out", str(tmp_path / "s"), "--shard-size", "6", "--no-progress")
    assert r.returncode == 0 and "nothing to convert" in r.stdout
    for bad in ("0", "-1"):
        r = _run("--dataset", "imagenet", "--src", tree, "--out", str(tmp_path / "t"), "--workers", bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: --workers {bad}")
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- pre-sized shards (--max-side)

SIZES = {"big": (1200, 900), "tall": (375, 500), "small": (300, 200), "edge": (480, 320)}


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> str:
    """An ILSVRC-layout tree of real JPEGs: big ones, ImageNet-sized ones, and ones already <= 320 px
    on the shorter side (one exactly 320), plus a big PNG; val holds a big JPEG."""
    root = tmp_path_factory.mktemp("mixed") / "in"
    for c, cls in enumerate(("n00000001", "n00000002")):
        for split in ("train", "val"):
            (root / split / cls).mkdir(parents=True)
        for i, (kind, size) in enumerate(SIZES.items()):
            (root / "train" / cls / f"{kind}_{i}.JPEG").write_bytes(imagenet_like_jpeg([7, c, i], size=size))
        (root / "val" / cls / "v.JPEG").write_bytes(imagenet_like_jpeg([8, c], size=(800, 600)))
    Image.new("RGB", (700, 500), (10, 200, 30)).save(root / "train" / "n00000001" / "png_9.png")
    return str(root)


def _members(shard_dir: str, split: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.startswith(split) and name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar if not m.name.endswith(".cls")})
    return out


def _sources(root: str, split: str) -> list[bytes]:
    return [open(os.path.join(d, n), "rb").read() for d, _, names in sorted(os.walk(os.path.join(root, split)))
            for n in sorted(names)]


def test_max_side_bounds_the_shorter_side_and_keeps_small_images(mixed_tree, tmp_path):
    out = str(tmp_path / "s320")
    rep = {}
    index = make_shards("imagenet", out, src=mixed_tree, shard_size=3, progress=False, max_side=320, report=rep)
    assert (index["max_side"], index["quality"]) == (320, 90) and "shorter side" in index["max_side_rule"]
    assert json.load(open(os.path.join(out, "index.json")))["max_side"] == 320  # recorded on disk
    train, sources = _members(out, "train"), _sources(mixed_tree, "train")
    assert len(train) == len(sources) == 9
    kept = resized = 0
    for name, data in train.items():
        src = sources[int(name.split("_")[-1].split(".")[0])]  # key = position in sorted class/file order
        with Image.open(io.BytesIO(data)) as im, Image.open(io.BytesIO(src)) as orig:
            (w, h), (sw, sh) = im.size, orig.size
            assert im.format == orig.format and min(w, h) <= 320, name
        if min(sw, sh) <= 320:  # small enough: the source's bytes, untouched
            kept += 1
            assert data == src, name
        else:  # re-encoded at exactly 320 on the shorter side, the longer side scaled alike (rounded)
            resized += 1
            assert min(w, h) == 320 and max(w, h) == round(max(sw, sh) * 320 / min(sw, sh)), (name, w, h, sw, sh)
    # small (300x200) and edge (480x320: exactly 320) of both classes are untouched; big, tall, the PNG re-encoded
    assert (kept, resized) == (4, 5) and rep["resized"] == 5
    assert sorted(_members(out, "val").values()) == sorted(_sources(mixed_tree, "val"))  # val: byte-for-byte
    full = make_shards("imagenet", str(tmp_path / "full"), src=mixed_tree, shard_size=3, progress=False)
    assert full["max_side"] is None and full["quality"] is None and "max_side_rule" not in full


def test_max_side_is_deterministic_and_resumes_only_the_same_conversion(mixed_tree, tmp_path):
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    a = make_shards("imagenet", one, src=mixed_tree, shard_size=2, progress=False, max_side=256, quality=80)
    b = make_shards("imagenet", two, src=mixed_tree, shard_size=2, progress=False, max_side=256, quality=80,
                    workers=2)
    assert a == b and _files(one) == _files(two)  # byte-identical shards and index.json whatever the workers
    rep = {}
    make_shards("imagenet", two, src=mixed_tree, shard_size=2, progress=False, max_side=256, quality=80, report=rep)
    assert rep["written"] == 0 and _files(one) == _files(two)  # the same conversion again: all kept
    # Another size, another quality, or full size into the same directory: the train shards are rewritten
    # (a shard whose images are all small enough is the same under any conversion, and rightly kept)
    for k, kw in enumerate(({"max_side": 320, "quality": 80}, {"max_side": 256, "quality": 70}, {})):
        rep = {}
        index = make_shards("imagenet", two, src=mixed_tree, shard_size=2, progress=False, report=rep, **kw)
        assert 0 < rep["written"] <= 9 and index["max_side"] == kw.get("max_side"), (kw, rep)
        assert index["quality"] == kw.get("quality")
        ref = str(tmp_path / f"ref{k}")
        make_shards("imagenet", ref, src=mixed_tree, shard_size=2, progress=False, **kw)
        assert _files(ref) == _files(two)  # what a fresh conversion writes, byte for byte


def test_max_side_cli_and_bad_arguments(mixed_tree, tmp_path):
    out = str(tmp_path / "s")
    r = _run("--dataset", "imagenet", "--src", mixed_tree, "--out", out, "--max-side", "320", "--quality", "85",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "pre-sized: 5 of the images written re-encoded to 320 px on the shorter side at JPEG quality 85" in r.stdout
    assert json.load(open(os.path.join(out, "index.json")))["quality"] == 85
    for args, words in ((["--max-side", "0"], "error: --max-side 0 is invalid"),
                        (["--quality", "80"], "error: --quality 80 applies only with --max-side"),
                        (["--max-side", "320", "--quality", "99"], "error: --quality 99 is invalid"),
                        (["--dataset", "digits", "--max-side", "320"], "error: --max-side applies to image files")):
        base = ["--dataset", "imagenet", "--src", mixed_tree] if "--dataset" not in args else []
        r = _run(*base, "--out", str(tmp_path / "t"), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(words), (args, r.stderr)
    assert not (tmp_path / "t").exists()  # refused before any work
