"""The GPU decode path (data.decode=gpu, risgd_data.gpu_decode), tested on the CPU: its code run
with device="cpu" (torchvision's decode_jpeg on libjpeg-turbo) against the CPU path's output for
the same (seed, rank, step): the same crop boxes, flips, jitters and shapes, pixels within JPEG
decoder tolerance, the same bits given the same resized crop; refusals in one line."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from risgd_data import gpu_decode as gd
from risgd_data.errors import DataError
from risgd_data.index import load_index
from risgd_data.loader import _mix, make_train_loader
from risgd_data.make_shards import make_shards
from risgd_data.manifest import build_manifest
from risgd_data.synthetic import imagenet_like_jpeg, photo_like_image, write_imagenet_tree
from risgd_data.transforms import FastTrainTransform, TrainParams, train_transform
from risgd_trainer.run_config import RecipeError, resolve_run


@pytest.fixture(scope="module")
def fast():
    return train_transform("imagenet", fast=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("gd")
    write_imagenet_tree(str(root / "src"), 30, 4, classes=3, seed=1)
    make_shards("imagenet", str(root / "s"), src=str(root / "src"), shard_size=8, progress=False)
    return str(root / "s")


def _seed(s: int) -> None:
    random.seed(s)
    torch.default_generator.manual_seed(s)


def _levels(x: torch.Tensor, tf: FastTrainTransform) -> torch.Tensor:
    return (x * tf.std + tf.mean) * 255


def test_check_decode_refuses_gpu_without_cuda_in_one_line():
    gd.check_decode("cpu")
    gd.check_decode("gpu", cuda_available=True)
    for bad, words in (("gpu", "data.decode=gpu but CUDA is not available"), ("tpu", "data.decode must be cpu or gpu")):
        with pytest.raises(DataError) as e:
            gd.check_decode(bad, cuda_available=False)
        assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_the_draws_are_the_cpu_paths(fast, shards):
    """The worker's table holds, per slot, the crop, flip and jitter the CPU path draws for the same
    (seed, rank, step, position), on the size the JPEG header gives."""
    m = build_manifest(load_index(shards), 1, 0.0)
    ld = make_train_loader(m, shards, 0, base_batch=7, seed=5, num_workers=0, decode="gpu", device="cpu")
    steps = ld._steps
    for step in (0, 3):
        enc, labels, skipped = steps[step]
        assert skipped == 0 and enc["ready_slots"].numel() == 0 and enc["slots"].tolist() == list(range(7))
        assert tuple(enc["shape"].tolist()) == (7, 3, 224, 224) and labels.shape == (7,)
        raws = torch.split(enc["data"], enc["sizes"].tolist())
        for slot, (c, p, off, pos) in enumerate(steps.sample_ids(step)):
            raw = bytes(raws[slot].numpy())
            gid = int(steps._perm(c, p)[off])
            assert raw == steps.decoder.files.read(int(steps.decoder.shard_of[gid]), int(steps.decoder.offsets[gid]),
                                                   int(steps.decoder.sizes[gid]))
            _seed(_mix(5, 0, step, pos))
            want = fast.sample_params(*Image.open(io.BytesIO(raw)).size)
            assert enc["params"][slot].tolist() == gd._params_row(want)


def test_same_bits_as_the_cpu_path_given_the_same_resized_crop(fast):
    """Flip, ColorJitter in each sample's order, ToTensor, Normalize: batched, the CPU path's bits."""
    rng = np.random.default_rng(3)
    dev = gd.DeviceDecode(fast, "cpu")
    crops, rows, want = [], [], []
    for k in range(24):
        crop = photo_like_image(224, 224, rng)
        order = tuple(int(v) for v in rng.permutation(4))
        b, c, s = (float(v) for v in rng.uniform(0.6, 1.4, 3))
        p = TrainParams(0, 0, 224, 224, bool(k % 2), order, b, c, s)
        want.append(fast._finish(crop, p, 1, None))  # 224 -> 224: the resize is the identity
        crops.append(torch.from_numpy(crop).permute(2, 0, 1).float())
        rows.append(gd._params_row(p))
    got = dev.finish(torch.stack(crops), torch.tensor(rows, dtype=torch.float64))
    assert torch.equal(got, torch.stack(want))


def test_loader_gpu_path_on_the_cpu_matches_the_cpu_path(shards):
    m = build_manifest(load_index(shards), 1, 0.0)
    kw = dict(base_batch=6, seed=3)
    cpu = make_train_loader(m, shards, 0, num_workers=0, **kw)
    gpu = make_train_loader(m, shards, 0, num_workers=0, decode="gpu", device="cpu", **kw)
    tf = cpu._steps.decoder.fast
    it = iter(gpu)
    first = [next(it) for _ in range(3)]
    for step, (x, y) in enumerate(first):
        a, ya = cpu.batch_at(step)
        assert x.shape == a.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and torch.equal(y, ya)
        d = (_levels(a, tf) - _levels(x, tf)).abs()
        # decoders (a level or two) and the resize's rounding, through the jitter's truncations
        assert float(d.mean()) < 0.5 and float(d.max()) <= 12, (float(d.mean()), float(d.max()))
        assert float(d.flatten(1).mean(1).max()) < 1.0  # every sample: the same crop (a wrong one is ~40)
    workers = make_train_loader(m, shards, 0, num_workers=2, decode="gpu", device="cpu", **kw)
    for (x, y), (xw, yw) in zip(first, iter(workers)):  # encoded batches through shared memory
        assert torch.equal(x, xw) and torch.equal(y, yw)
    resumed = make_train_loader(m, shards, 0, num_workers=0, start_step=2, decode="gpu", device="cpu", **kw)
    assert torch.equal(next(iter(resumed))[0], first[2][0])
    assert torch.equal(gpu.batch_at(1)[0], first[1][0])


def test_what_the_gpu_path_does_not_take_is_the_cpu_paths(fast):
    """CMYK, PNG, truncated: decoded (or skipped) in the worker by the CPU path itself, bit for bit."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(photo_like_image(300, 200, rng))
    cases = {}
    for mode, fmt in (("CMYK", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"), ("RGB", "JPEG")):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=fmt)
        cases[f"{mode} {fmt}"] = buf.getvalue()
    slots = gd.EncodedSlots(6, fast.size)
    for slot, (name, raw) in enumerate(cases.items()):
        _seed(slot)
        assert gd.encode_sample(fast, raw, slots[slot]), name
    assert slots.ready_slots == [0, 1] and slots.slots == [2, 3]  # grey and RGB JPEGs go to the device
    for slot, raw in ((0, cases["CMYK JPEG"]), (1, cases["RGB PNG"])):
        _seed(slot)
        assert torch.equal(slots.ready[slot], fast.decode_bytes(raw))
    good = cases["RGB JPEG"]
    for bad in (good[: len(good) // 2], b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9", b"not an image"):
        assert gd.gpu_decodable(bad) is None and not gd.encode_sample(fast, bad, slots[4])
    enc = slots.finish()
    out = gd.DeviceDecode(fast, "cpu")(enc)
    assert out.shape == (6, 3, 224, 224) and torch.equal(out[0], slots.ready[0])
    _seed(3)
    d = (_levels(out[3], fast) - _levels(fast.decode_bytes(good), fast)).abs()
    assert float(d.mean()) < 0.5


def test_gpu_decode_refusals(shards, monkeypatch):
    m = build_manifest(load_index(shards), 1, 0.0)
    with pytest.raises(DataError, match="data.decode=gpu decodes JPEG training data"):
        make_train_loader(m, shards, 0, base_batch=4, decode="gpu", device="cpu",
                          transform=train_transform("imagenet", fast=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="CUDA is not available"):
        make_train_loader(m, shards, 0, base_batch=4, decode="gpu")


def test_recipe_key_data_decode(tmp_path, monkeypatch, capsys):
    """One declaration (trainer.run_config.SCHEMA), checked before any process group: a wrong value, a
    dataset the GPU path does not decode, and gpu without CUDA are one line each; train exits 2."""
    base = ["steps=25050", "epochs=0", "data.manifest=null", f"runs_dir={tmp_path}"]
    imagenet = "recipes/imagenet_resnet50.yaml"
    assert resolve_run(imagenet, base, 8).cfg["data"]["decode"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_run(imagenet, [*base, "data.decode=gpu"], 8).cfg["data"]["decode"] == "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        (imagenet, ["data.decode=gpu"], "data.decode=gpu but CUDA is not available on this machine"),
        (imagenet, ["data.decode=nvjpeg"], "data.decode must be cpu or gpu"),
        (imagenet, ["data.decode=gpu", "data.fast_decode=false"], "data.decode=gpu decodes JPEG training data"),
        ("recipes/digits.yaml", ["data.decode=gpu"], "data.decode=gpu decodes JPEG training data"),
    ]
    for recipe, overrides, words in cases:
        with pytest.raises(RecipeError) as e:
            resolve_run(recipe, [*base, *overrides], 8 if recipe == imagenet else 4)
        assert str(e.value).startswith(words) and "\n" not in str(e.value), str(e.value)
    import train

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--recipe", imagenet, *base, "data.decode=gpu"]) == 2
    assert "data.decode=gpu but CUDA is not available" in capsys.readouterr().err
    assert not dist.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the CPU tests above cover the code)")
def test_on_the_gpu_close_to_the_cpu_path(fast):
    blobs = [imagenet_like_jpeg([7, i]) for i in range(8)]
    slots_c, slots_g = gd.EncodedSlots(8, fast.size), gd.EncodedSlots(8, fast.size)
    for i, raw in enumerate(blobs):
        _seed(i)
        gd.encode_sample(fast, raw, slots_c[i])
        _seed(i)
        gd.encode_sample(fast, raw, slots_g[i])
    a = gd.DeviceDecode(fast, "cpu")(slots_c.finish())
    b = gd.DeviceDecode(fast, "cuda")(slots_g.finish()).cpu()
    d = (_levels(a, fast) - _levels(b, fast)).abs()
    assert float(d.mean()) < 1.0 and float(d.max()) <= 24
