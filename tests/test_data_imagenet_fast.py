"""The fast ImageNet train path (transforms.FastTrainTransform): the same random draws as timm's
transform, RandomResizedCrop's crop distribution, output close to the slow path, decoders, the loader."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms import functional as F

from risgd_data import transforms as tfm
from risgd_data.index import load_index, split_arrays
from risgd_data.loader import _mix, make_eval_loader, make_train_loader
from risgd_data.make_shards import make_shards
from risgd_data.manifest import build_manifest
from risgd_data.synthetic import imagenet_like_jpeg, photo_like_image, write_imagenet_tree
from risgd_data.transforms import FastTrainTransform, TrainParams, eval_transform, train_transform

HAS_SJ = tfm._simplejpeg() is not None
DECODERS = ["pil", "simplejpeg"] if HAS_SJ else ["pil"]
SIZES = [(500, 375), (375, 500), (500, 333), (500, 500), (333, 250), (1200, 900), (224, 224), (90, 60),
         (1000, 120)]  # ImageNet's shapes, a large one (reductions), tiny and extreme ones (fallback crops)


@pytest.fixture(scope="module")
def slow():
    return train_transform("imagenet", fast=False)


@pytest.fixture(scope="module")
def blobs():  # ImageNet-like JPEGs, and large ones whose big crops are decoded at a reduced scale
    return [imagenet_like_jpeg([5, i]) for i in range(5)] + [imagenet_like_jpeg([6, i], size=(1200, 900))
                                                             for i in range(2)]


def _seed(s: int) -> None:
    random.seed(s)
    torch.default_generator.manual_seed(s)


def _slow_draws(slow, width: int, height: int) -> TrainParams:
    """The draws of timm's Compose, made by its own components in its order."""
    rrc, flip, cj = slow.transforms[:3]
    i, j, h, w = rrc.get_params(Image.new("RGB", (width, height)), rrc.scale, rrc.ratio)
    f = bool(torch.rand(1) < flip.p)
    order, b, c, s, _ = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
    return TrainParams(i, j, h, w, f, tuple(order.tolist()), b, c, s)


def _levels(x: torch.Tensor, tf: FastTrainTransform) -> torch.Tensor:
    return (x * tf.std + tf.mean) * 255  # back to pixel levels


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def test_fast_is_the_default_for_imagenet_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(tfm.FAST_DECODE_ENV, raising=False)
    for ds in ("imagenet", "imagefolder"):
        assert isinstance(train_transform(ds), FastTrainTransform)
        assert isinstance(train_transform(ds, fast=False), T.Compose)
    monkeypatch.setenv(tfm.FAST_DECODE_ENV, "0")
    assert isinstance(train_transform("imagenet"), T.Compose)
    assert isinstance(train_transform("imagenet", fast=True), FastTrainTransform)  # asked for explicitly
    # digits and CIFAR: exactly the transforms they always had, whatever `fast` says.
    for fast in (None, True, False):
        assert repr(train_transform("cifar10", fast=fast)) == repr(T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(*tfm.CIFAR_STATS["cifar10"])]))
        assert repr(train_transform("digits", fast=fast)) == repr(eval_transform("digits"))
    with pytest.raises(ValueError, match="decoder"):
        FastTrainTransform(train_transform("imagenet", fast=False), decoder="nope")
    # Without simplejpeg (optional), the fast path decodes with PIL, and the plain decode falls back too.
    monkeypatch.setattr(tfm, "_SJ", [None])
    monkeypatch.delenv(tfm.FAST_DECODE_ENV)
    assert train_transform("imagenet").decoder == "pil"
    assert tfm.decode_jpeg_rgb(imagenet_like_jpeg([0], size=(64, 48))) is None
    with pytest.raises(ValueError, match="not installed"):
        FastTrainTransform(train_transform("imagenet", fast=False), decoder="simplejpeg")
    with pytest.raises(ValueError, match="pipeline"):
        FastTrainTransform(eval_transform("imagenet"))


def test_same_draws_as_the_slow_transform(slow):
    """Exact: under the same seeds the fast path draws the slow path's crop, flip and jitter, and
    leaves Python's and torch's generators exactly where the whole slow transform leaves them."""
    fast = FastTrainTransform(slow, decoder="pil")
    for width, height in SIZES:
        img = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
        for s in range(300):
            _seed(s)
            expected = _slow_draws(slow, width, height)
            _seed(s)
            assert fast.sample_params(width, height) == expected, (width, height, s)
            after = random.getstate(), torch.default_generator.get_state()
            if s < 10:  # the real Compose consumes the generators as the component draws above do
                _seed(s)
                slow(img)
                assert random.getstate() == after[0] and torch.equal(torch.default_generator.get_state(), after[1])


def test_crop_distribution_is_random_resized_crops():
    """Statistical: crops drawn on the header's size have torchvision RandomResizedCrop.get_params'
    distribution of scale, log aspect ratio and position (two-sample KS tests, other RNG streams)."""
    fast = FastTrainTransform(train_transform("imagenet", fast=False), decoder="pil")
    rrc = T.RandomResizedCrop(224)
    for width, height in ((500, 375), (375, 500)):
        random.seed(1)
        torch.manual_seed(2)
        ours = np.array([(p.height, p.width, p.top, p.left) for p in
                         (fast.sample_params(width, height) for _ in range(4000))], dtype=float)
        torch.manual_seed(3)
        img = torch.empty((1, 1, 1)).expand(3, height, width)
        ref = np.array([rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(4000)], dtype=float)[:, [2, 3, 0, 1]]
        for a in (ours, ref):  # scale, log aspect ratio, relative top and left
            a[:] = np.stack([a[:, 0] * a[:, 1] / (width * height), np.log(a[:, 1] / a[:, 0]), a[:, 2] / height,
                             a[:, 3] / width], axis=1)
        for k, name in enumerate(("scale", "log ratio", "top", "left")):
            assert ks_2samp(ours[:, k], ref[:, k]).pvalue > 1e-3, name
        assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.02


def test_jitter_and_normalize_reproduce_the_slow_bits(slow):
    """Given the same resized crop, flip + ColorJitter + ToTensor + Normalize are bitwise PIL's and
    torchvision's: a 224x224 image cropped whole goes through an identity resize."""
    fast = FastTrainTransform(slow, decoder="pil")
    cj, norm = slow.transforms[2], slow.transforms[4]
    rng = np.random.default_rng(0)
    for k in range(30):
        arr = photo_like_image(224, 224, rng) if k % 2 else rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        _seed(k)
        p = fast.sample_params(224, 224)
        p = TrainParams(0, 0, 224, 224, p.flip, p.order, p.brightness, p.contrast, p.saturation)
        img = Image.fromarray(arr)
        if p.flip:
            img = F.hflip(img)
        for op in p.order:
            if op == 0:
                img = F.adjust_brightness(img, p.brightness)
            elif op == 1:
                img = F.adjust_contrast(img, p.contrast)
            elif op == 2:
                img = F.adjust_saturation(img, p.saturation)
        expected = norm(T.ToTensor()(img))
        assert cj.hue is None
        assert torch.equal(fast._finish(arr, p, 1, None), expected), k


@pytest.mark.parametrize("decoder", DECODERS)
def test_output_close_to_the_slow_path_for_the_same_crop(slow, blobs, decoder):
    """Same seeds, so the same crop: full-resolution decodes differ only by the resize (torch's
    antialiased bilinear vs PIL's), reduced decodes (DCT scaling) a little more."""
    fast = FastTrainTransform(slow, decoder=decoder)
    full, reduced = [], []
    for n, raw in enumerate(blobs):
        decoded = Image.open(io.BytesIO(raw)).convert("RGB")
        for s in range(6):
            _seed(1000 * n + s)
            a = _levels(slow(decoded), fast)
            _seed(1000 * n + s)
            before = fast.counts["reduced"]
            b = _levels(fast.decode_bytes(raw), fast)
            (reduced if fast.counts["reduced"] > before else full).append(
                (float((a - b).abs().mean()), _psnr(a, b)))
    full, reduced = np.array(full), np.array(reduced)
    assert len(full) > 25 and len(reduced) >= 4
    assert full[:, 0].mean() < 0.1 and full[:, 0].max() < 0.5 and full[:, 1].min() > 45  # levels, dB
    assert reduced[:, 0].mean() < 2.5 and reduced[:, 1].min() > 30 and np.median(reduced[:, 1]) > 38
    assert fast.counts["pil"] == (fast.counts["decoded"] if decoder == "pil" else 0)


def test_reduction_keeps_the_crop_at_least_the_output_size(slow):
    fast = FastTrainTransform(slow, decoder="pil")
    random.seed(0)
    torch.manual_seed(0)
    seen = set()
    for width, height in ((4000, 3000), (1200, 900), (500, 375)):
        for _ in range(500):
            p = fast.sample_params(width, height)
            r = fast.reduction(p)
            seen.add(r)
            assert p.height / r >= 224 and p.width / r >= 224 or r == 1
            assert r == 8 or p.height < 2 * r * 224 or p.width < 2 * r * 224  # the largest such r
    assert seen == {1, 2, 4, 8}


@pytest.mark.parametrize("decoder", DECODERS)
def test_other_inputs_grey_cmyk_png_corrupt(slow, decoder):
    fast = FastTrainTransform(slow, decoder=decoder)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(photo_like_image(300, 200, rng))
    cases = {}
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG")):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=fmt)
        cases[f"{mode} {fmt}"] = buf.getvalue()
    for name, raw in cases.items():
        _seed(7)
        a = _levels(slow(Image.open(io.BytesIO(raw)).convert("RGB")), fast)
        _seed(7)
        b = _levels(fast.decode_bytes(raw), fast)
        assert b.shape == (3, 224, 224) and _psnr(a, b) > 40, name
    good = cases["L JPEG"]
    for bad in (good[: len(good) // 2], b"\xff\xd8\xff\xe0" + bytes(300), b"not an image"):
        assert fast.decode_bytes(bad) is None  # the loader skips it, as on the slow path


@pytest.mark.skipif(not HAS_SJ, reason="simplejpeg not installed")
def test_simplejpeg_decodes_the_same_pixels_as_pil():
    rng = np.random.default_rng(2)
    for _ in range(3):
        arr = photo_like_image(int(rng.integers(100, 520)), int(rng.integers(100, 520)), rng)
        for kw in ({}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True}, {"quality": 60},
                   {"optimize": True, "quality": 97}):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", **kw)
            raw = buf.getvalue()
            assert np.array_equal(tfm.decode_jpeg_rgb(raw), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        buf = io.BytesIO()
        Image.fromarray(arr).convert("L").save(buf, format="JPEG")  # greyscale: replicated to RGB by both
        raw = buf.getvalue()
        assert np.array_equal(tfm.decode_jpeg_rgb(raw), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    assert tfm.decode_jpeg_rgb(b"\x89PNG\r\n\x1a\n") is None


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    write_imagenet_tree(str(root / "src"), 24, 6, classes=3, seed=0)
    make_shards("imagenet", str(root / "s"), src=str(root / "src"), shard_size=8, progress=False)
    return str(root / "s")


def test_loader_fast_by_default_deterministic_and_close_to_slow(imagenet_shards):
    index = load_index(imagenet_shards)
    m = build_manifest(index, 1, 0.0)
    kw = dict(base_batch=6, seed=3)
    fast = make_train_loader(m, imagenet_shards, 0, num_workers=0, **kw)
    assert isinstance(fast._steps.decoder.transform, FastTrainTransform)
    it = iter(fast)
    first = [next(it) for _ in range(3)]
    assert first[0][0].shape == (6, 3, 224, 224) and first[0][0].is_contiguous()
    workers = make_train_loader(m, imagenet_shards, 0, num_workers=2, **kw)  # shared-memory batches
    for (x, y), (xw, yw) in zip(first, iter(workers)):
        assert torch.equal(x, xw) and torch.equal(y, yw)
    resumed = make_train_loader(m, imagenet_shards, 0, num_workers=0, start_step=2, **kw)
    assert torch.equal(next(iter(resumed))[0], first[2][0])
    slow = make_train_loader(m, imagenet_shards, 0, num_workers=0, transform=train_transform("imagenet", fast=False),
                             **kw)
    for step in range(3):  # the same crops, flips and jitters: close
        a, b = slow.batch_at(step)[0], first[step][0]
        assert float((a - b).abs().mean()) < 0.01 and torch.equal(slow.batch_at(step)[1], first[step][1])


def test_slow_loader_output_is_the_timm_transform_of_the_pil_decode(imagenet_shards):
    """The as-is path (timm transform) decodes RGB JPEGs with simplejpeg where installed: its batches
    are still bitwise what PIL's decode + the transform give under the loader's per-sample seeds."""
    index = load_index(imagenet_shards)
    m = build_manifest(index, 1, 0.0)
    tf = train_transform("imagenet", fast=False)
    ld = make_train_loader(m, imagenet_shards, 0, base_batch=5, seed=9, transform=tf, num_workers=0)
    a = split_arrays(index)
    for step in (0, 3):
        expected = []
        for pos, gid in enumerate(ld.sample_ids(step)):
            k = int(a.shard_of[gid])
            with open(f"{imagenet_shards}/{a.names[k]}", "rb") as f:
                f.seek(int(a.offsets[gid]))
                raw = f.read(int(a.sizes[gid]))
            _seed(_mix(9, 0, step, pos))
            expected.append(tf(Image.open(io.BytesIO(raw)).convert("RGB")))
        assert torch.equal(ld.batch_at(step)[0], torch.stack(expected))


def test_eval_path_unchanged(imagenet_shards):
    index = load_index(imagenet_shards)
    tf = eval_transform("imagenet")
    a = split_arrays(index, "val")
    expected = []
    for gid in range(len(a.labels)):
        with open(f"{imagenet_shards}/{a.names[int(a.shard_of[gid])]}", "rb") as f:
            f.seek(int(a.offsets[gid]))
            expected.append(tf(Image.open(io.BytesIO(f.read(int(a.sizes[gid])))).convert("RGB")))
    got = torch.cat([x for x, _ in make_eval_loader(imagenet_shards, 4)])
    assert torch.equal(got, torch.stack(expected))


def test_other_jitter_settings_and_pickling(blobs):
    """A timm transform with only some ColorJitter factors: the same draws (ColorJitter.get_params
    itself) and the same bits after the resize; a pickled copy (spawned workers) decodes the same."""
    import pickle

    from timm.data import create_transform

    slow = create_transform(224, is_training=True, color_jitter=(0.3, 0.0, 0.2))
    fast = FastTrainTransform(slow, decoder="pil")
    assert slow.transforms[2].contrast is None and not fast._one_range
    for s in range(100):
        _seed(s)
        expected = _slow_draws(slow, 500, 375)
        _seed(s)
        assert fast.sample_params(500, 375) == expected
    raw = blobs[0]
    decoded = Image.open(io.BytesIO(raw)).convert("RGB")
    copy = pickle.loads(pickle.dumps(fast))
    for s in range(4):
        _seed(s)
        a = _levels(slow(decoded), fast)
        _seed(s)
        b = fast.decode_bytes(raw)
        _seed(s)
        assert torch.equal(copy.decode_bytes(raw), b)
        assert _psnr(a, _levels(b, fast)) > 45
