"""Per-rank RI-SGD train loader and the evaluation loader.

Design: map-style random access instead of WebDataset streaming. index.json records the byte
offset of every image member, so any sample is one pread. For step s, the sample ids are a pure
function of (seed, rank, step): chunk i contributes b_i samples taken from an endless sequence of
seeded permutations of that chunk (one permutation per pass). That gives
  * a true per-chunk shuffle (so no shuffle buffer is needed: buffers only approximate this),
  * exact determinism whatever the number of workers, and O(1) resume at any step,
  * a fixed number of steps per epoch for every rank (from the manifest), so no rank waits.
Batches are [chunk 0's b_0 samples | chunk 1's b_1 samples | ...] (own chunk first), which are
the paper's per-chunk mini-batches; `sub_batch_sizes` tells how to split them.

Node-level workers (`share=(l, k)`): a manifest worker may be a node of k ranks that split its data.
The worker's step batch is planned as for one rank with base batch base_batch * k, and share l
takes, from every chunk's sub-batch of size b_c, the contiguous positions [l*b_c//k, (l+1)*b_c//k).
Augmentation seeds and corrupt-sample substitution use the position in the WHOLE worker batch, so
concatenating, chunk by chunk, share 0's slice, share 1's slice, ... gives exactly (bitwise) the
batch of the share=(0, 1) loader with base batch base_batch * k.
"""

from __future__ import annotations

import io
import itertools
import math
import numbers
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from risgd_common.install import command

from .errors import DataError
from .gpu_decode import DeviceDecode, EncodedSlots, check_decode, encode_sample
from .index import load_index, split_arrays, verify_shards
from .manifest import load_manifest, rank_chunk_ids, steps_per_epoch
from .tario import ShardFiles
from .transforms import FastTrainTransform, decode_jpeg_rgb, eval_transform, image_mode, train_transform

POLICIES = ("per_chunk", "split")
_MASK = (1 << 64) - 1


def _mix(*words: int) -> int:
    """splitmix64-style hash of integers -> 63-bit seed (cheap, stable across versions)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (w & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h >> 1


class _Decoder:
    """Reads and decodes samples of one split by global id; undecodable ones return None.

    A transform with `takes_bytes` (transforms.FastTrainTransform) gets the encoded image and may
    write its result straight into a slot of the batch; any other gets the decoded PIL image. With
    `simplejpeg=True` (the train loader) RGB JPEGs are decoded by simplejpeg when it is installed:
    the same pixels as PIL's decode (tested), faster; everything else, and every eval split, by PIL.
    """

    def __init__(self, shard_dir: str, index: dict, split: str, transform: Callable, simplejpeg: bool = False):
        a = split_arrays(index, split)
        self.files = ShardFiles([f"{shard_dir}/{n}" for n in a.names])
        self.offsets, self.sizes, self.shard_of, self.labels = a.offsets, a.sizes, a.shard_of, a.labels
        self.starts = a.starts
        self.mode = image_mode(index["dataset"])
        self.transform = transform
        self.fast = transform if getattr(transform, "takes_bytes", False) else None
        self.simplejpeg = simplejpeg and self.mode == "RGB"  # same pixels as PIL, faster (train only)

    def decode(self, gid: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        raw = self.files.read(int(self.shard_of[gid]), int(self.offsets[gid]), int(self.sizes[gid]))
        if self.fast is not None:
            return self.fast.decode_bytes(raw, out)
        arr = decode_jpeg_rgb(raw) if self.simplejpeg else None
        if arr is not None:
            return self.transform(Image.fromarray(arr))
        try:
            im = Image.open(io.BytesIO(raw))
            im.load()  # the full decode: truncation shows up here
            img = im if im.mode == self.mode else im.convert(self.mode)  # same pixels, one copy fewer
        except Exception:  # any decoder error means a corrupt sample: skip it, never crash
            return None
        return self.transform(img)

    def batch(self, n: int, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """An [n, ...] batch tensor: `images` stacked, or (fast path, images=None) empty slots to write.
        In a DataLoader worker it lives in shared memory, as default_collate does it, so handing it
        to the main process copies nothing."""
        shape = (n, *images[0].shape) if images else (n, 3, *self.fast.size)
        if torch.utils.data.get_worker_info() is not None:
            proto = torch.empty(0)
            out = proto.new(proto._typed_storage()._new_shared(math.prod(shape), device=proto.device))
            out = out.resize_(shape)
        else:
            out = torch.empty(shape)
        return torch.stack(images, out=out) if images else out

    def finish(self, images):
        """A step's batch as the fast path filled it, as the worker hands it on."""
        return images


class _GpuDecoder(_Decoder):
    """decode="gpu": the step's samples leave the worker encoded, with their draws (gpu_decode)."""

    def batch(self, n: int, images: list[torch.Tensor] | None = None):
        return EncodedSlots(n, self.fast.size) if images is None else super().batch(n, images)

    def decode(self, gid: int, out=None):
        if out is None:
            return super().decode(gid)
        raw = self.files.read(int(self.shard_of[gid]), int(self.offsets[gid]), int(self.sizes[gid]))
        return True if encode_sample(self.fast, raw, out) else None

    def finish(self, images: EncodedSlots):
        return images.finish()


class _TrainSteps(torch.utils.data.Dataset):
    """Item s = this share's part of the batch of step s (images, labels, corrupt samples skipped).

    `sub_sizes` are the whole worker's per-chunk sizes; `share` = (l, k) selects positions
    [l*b//k, (l+1)*b//k) of every chunk's b; `share_sizes` are the resulting per-chunk sizes."""

    def __init__(self, decoder: _Decoder, chunk_ids: list[np.ndarray], sub_sizes: list[int], seed: int,
                 rank: int, share: tuple[int, int] = (0, 1), chunk_index: list[int] | None = None,
                 cursor: dict | None = None):
        self.decoder, self.chunk_ids, self.sub_sizes = decoder, chunk_ids, sub_sizes
        self.seed, self.rank = seed, rank
        # The cursor: where each chunk's stream stands at step `origin` (``cursor(step)`` of the loader this one
        # follows, whose sub-batches may have been other); from there it advances by this loader's b a step.
        # Without one, the stream of a chunk is at step * b (the loader has had these sizes from step 0).
        self.chunk_index = list(range(len(chunk_ids))) if chunk_index is None else list(chunk_index)
        self.origin = int(cursor["step"]) if cursor else 0
        at = {int(k): int(v) for k, v in (cursor or {}).get("positions", {}).items()}
        self.base = [at.get(i, self.origin * b) for i, b in zip(self.chunk_index, sub_sizes)]
        part, k = share
        # (chunk, first position inside the chunk's sub-batch, count, chunk's start in the worker batch)
        self._slices, start = [], 0
        for c, b in enumerate(sub_sizes):
            lo, hi = part * b // k, (part + 1) * b // k
            self._slices.append((c, lo, hi - lo, start))
            start += b
        self.share_sizes = [n for _, _, n, _ in self._slices]
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bad: set[int] = set()

    def _perm(self, chunk: int, pass_: int) -> np.ndarray:
        key = (chunk, pass_)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, self.rank, chunk, pass_, 0x9E])
            self._perms[key] = self.chunk_ids[chunk][rng.permutation(len(self.chunk_ids[chunk]))]
            if len(self._perms) > 2 * len(self.chunk_ids):
                self._perms.popitem(last=False)
        return self._perms[key]

    def sample_ids(self, step: int) -> list[tuple[int, int, int, int]]:
        """[(chunk, pass, offset, pos)] of this share at step `step`, pos = the position in the whole
        worker batch: a pure function of (seed, rank, step) and the share."""
        out = []
        for c, lo, count, start in self._slices:
            n, b = len(self.chunk_ids[c]), self.sub_sizes[c]
            j = lo + np.arange(count)
            t = self.base[c] + (step - self.origin) * b + j
            out.extend((c, int(p), int(o), start + int(i)) for p, o, i in zip(t // n, t % n, j))
        return out

    def cursor(self, step: int) -> dict:
        """Where each chunk's stream stands at step ``step``: {"step", "positions": {chunk of the worker, in
        manifest order: samples drawn from it so far}}. A loader built with it at that step goes on drawing
        each chunk where this one would have, whatever its own sub-batches (none twice within a pass, none
        skipped); checkpoints carry it, so a resumed run does too."""
        return {"step": int(step), "worker": self.rank,
                "positions": {str(i): int(base + (step - self.origin) * b)
                              for i, base, b in zip(self.chunk_index, self.base, self.sub_sizes)}}

    def __getitem__(self, step: int):
        # Seed only the CPU default generator: torch.manual_seed also seeds CUDA lazily and costs
        # ~100 us per call (a traceback is captured), more than decoding a CIFAR image.
        gen = torch.default_generator
        py_state, torch_state = random.getstate(), gen.get_state()
        ids = self.sample_ids(step)
        fast = self.decoder.fast is not None
        images = self.decoder.batch(len(ids)) if fast else []  # fast path: decoded into its slot
        labels, skipped = [], 0
        try:
            for slot, (c, p, off, pos) in enumerate(ids):
                perm = self._perm(c, p)
                for k in range(len(perm)):
                    # A corrupt sample is replaced by the next one in the same permutation; the seed
                    # is that of the position in the whole worker batch, whatever the share.
                    gid = int(perm[(off + k) % len(perm)])
                    if gid not in self._bad:
                        s = _mix(self.seed, self.rank, step, pos)
                        random.seed(s)
                        gen.manual_seed(s)
                        img = self.decoder.decode(gid, images[slot] if fast else None)
                        if img is not None:
                            break
                        self._bad.add(gid)
                    skipped += 1
                else:
                    raise DataError(f"every sample of chunk {c} is undecodable: rebuild the shards")
                if not fast:
                    images.append(img)
                labels.append(int(self.decoder.labels[gid]))
        finally:
            random.setstate(py_state)
            gen.set_state(torch_state)
        batch = self.decoder.finish(images) if fast else self.decoder.batch(len(images), images)
        return batch, torch.tensor(labels, dtype=torch.long), skipped

    def __len__(self) -> int:  # only for tools that ask; the loader itself never ends
        return 1 << 62


class _From:
    """Sampler yielding step numbers start, start+1, ... forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class RankLoader:
    """Infinite iterator of (images [B,C,H,W], labels [B]) for one rank; B = sum(sub_batch_sizes).

    With a share (l, k) of a node-level worker, `sub_batch_sizes` (one entry per chunk of the worker,
    0 where this share takes nothing from a chunk) and `batch_size` are this rank's own share.
    With `device_decode` (decode="gpu") the workers' batches are encoded and it decodes them: the
    images it yields are already on its device."""

    def __init__(self, steps: _TrainSteps, steps_per_epoch: int, start_step: int, num_workers: int,
                 pin_memory: bool = False, prefetch_factor: int = 4, device_decode: DeviceDecode | None = None):
        self._steps = steps
        self.device_decode = device_decode
        self.steps_per_epoch = steps_per_epoch
        self.sub_batch_sizes = list(steps.share_sizes)
        self.batch_size = sum(self.sub_batch_sizes)
        self.step = start_step  # the next step this loader yields
        self.samples_skipped = 0
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of any step, computed in this process (no state change except skip count)."""
        images, labels, skipped = self._steps[step]
        self.samples_skipped += skipped
        return (self.device_decode(images) if self.device_decode else images), labels

    def sample_ids(self, step: int) -> list[int]:
        """Global train ids planned for `step` for this share, batch order (before any corrupt-sample
        substitution)."""
        return [int(self._steps._perm(c, p)[o]) for c, p, o, _ in self._steps.sample_ids(step)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        dl = torch.utils.data.DataLoader(
            self._steps, batch_size=None, sampler=_From(self.step), num_workers=self.num_workers,
            pin_memory=self.pin_memory, **extra,
        )
        for images, labels, skipped in dl:
            # Counted here, in the main process, because workers cannot update our attributes.
            self.samples_skipped += int(skipped)
            self.step += 1
            yield (self.device_decode(images) if self.device_decode else images), labels

    def cursor(self, step: int) -> dict:
        """Each chunk's stream position at ``step`` (see ``make_train_loader(cursor=...)``)."""
        return self._steps.cursor(step)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_skipped": self.samples_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_skipped = int(state["step"]), int(state.get("samples_skipped", 0))


def sub_batch_sizes(fractions: list[float], sizes: list[int], base_batch: int, policy: str) -> list[int]:
    """Per-chunk sub-batch sizes.

    per_chunk: every full chunk gives base_batch, a partial chunk round(fraction * base_batch)
    (at least 1): compute grows with q, as in the paper. split: base_batch is shared across chunks
    in proportion to their sample counts (largest remainder), so compute equals the no-redundancy
    case.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: use per_chunk or split")
    if base_batch < 1:
        raise ValueError("base_batch must be >= 1")
    if policy == "per_chunk":
        return [base_batch if f >= 1.0 else max(1, round(f * base_batch)) for f in fractions]
    quota = np.asarray(sizes, dtype=float) * base_batch / sum(sizes)
    out = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - out), kind="stable")[: base_batch - out.sum()]:
        out[i] += 1
    return out.tolist()


def make_train_loader(
    manifest: dict | str, shard_dir: str, rank: int, base_batch: int, policy: str = "per_chunk",
    transform: Callable | None = None, seed: int = 0, start_step: int = 0, num_workers: int = 1,
    verify: bool = True, pin_memory: bool = False, share: tuple[int, int] = (0, 1), decode: str = "cpu",
    device: torch.device | str | None = None, chunk_scale: list[float] | None = None, cursor: dict | None = None,
) -> RankLoader:
    """The rank's infinite train loader. Raises DataError (one line) on a missing/mismatched shard.

    `rank` is the manifest worker index. `share` = (l, k): this process is rank l of the k ranks of
    a node-level worker `rank` (the manifest built with --workers = nodes). The worker's batch is
    planned for base batch base_batch * k (steps_per_epoch(manifest, base_batch * k) steps per
    epoch) and this share takes positions [l*b//k, (l+1)*b//k) of every chunk's sub-batch b; per
    sample augmentation seeds use the position in the whole worker batch, so the k shares of a step,
    concatenated chunk by chunk in share order, are bitwise the share=(0, 1) batch with base batch
    base_batch * k. The shares of a step are disjoint; their sizes can differ by one per chunk.
    share=(0, 1), the default, is the plain one-rank-per-worker loader.

    `transform` defaults to train_transform(dataset): for ImageNet-format data the fast path
    (transforms.FastTrainTransform, decoding into the batch), unless RISGD_FAST_DECODE=0; pass
    train_transform(dataset, fast=False) for timm's transform itself.

    `chunk_scale`: one factor per chunk of the worker (manifest order) scaling its sub-batch, e.g.
    manifest.chunk_draw_scales after workers are lost, so each chunk is still drawn at its share.
    `cursor`: the ``cursor(start_step)`` of the loader this one replaces (its sub-batches changed, or a
    checkpoint's): each chunk's stream goes on from where that one stood, so a chunk drawn faster while
    a worker is away, and back at its pace after, draws no sample twice within a pass and skips none.

    `decode="gpu"` (recipe key data.decode): the workers draw the crops and flips and leave the JPEG
    decode to `device` (default cuda; DataError in one line without CUDA), see gpu_decode: the
    batches come out on the device. device="cpu" runs that path's code on the CPU (tests, benchmarks)."""
    part, k = _check_share(share)
    device_decode = None
    if decode == "gpu":
        device = torch.device(device or "cuda")
        check_decode(decode, cuda_available=None if device.type == "cuda" else True)
    else:
        check_decode(decode)
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    index = load_index(shard_dir)
    if not 0 <= rank < manifest["workers"]:
        raise DataError(f"rank {rank} is not in the manifest's {manifest['workers']} workers")
    mine = {s["name"]: s["sha256"] for s in manifest["index"]["shards"]["train"]}
    for s in index["splits"]["train"]["shards"]:
        if mine.get(s["name"]) != s["sha256"]:
            raise DataError(f"shard {s['name']} in {shard_dir}/index.json differs from the manifest's: "
                            "rebuild the manifest for this index or replicate the matching shards")
    r = manifest["ranks"][rank]
    if verify:  # hash once here (per process), not per read
        verify_shards(index, shard_dir, r["shards"], fix=f"run {command('data.replicate')} --dest {shard_dir} "
                      f"(for this node) or {command('data.make_shards')} --out {shard_dir}")
    chunk_ids = rank_chunk_ids(manifest, index, rank)
    sizes = sub_batch_sizes([c["fraction"] for c in r["chunks"]], [len(i) for i in chunk_ids], base_batch * k,
                            policy)
    if chunk_scale is not None:
        if len(chunk_scale) != len(sizes) or any(not f > 0 for f in chunk_scale):
            raise DataError(f"chunk_scale {chunk_scale} must hold one factor > 0 per chunk of worker {rank} "
                            f"({len(sizes)})")
        sizes = [max(1, round(b * f)) if b else 0 for b, f in zip(sizes, chunk_scale)]
    epoch_steps = steps_per_epoch(manifest, base_batch * k)
    keep = [i for i, b in enumerate(sizes) if b > 0]  # split policy with a tiny batch can give 0
    kept = [sizes[i] for i in keep]
    if all((part + 1) * b // k == part * b // k for b in kept):
        raise DataError(f"base_batch {base_batch} is too small for k={k} ranks per worker: share {part} gets no "
                        f"sample of the worker's per-chunk sub-batches {kept}; raise base_batch or use fewer "
                        "ranks per node")
    transform = transform or train_transform(index["dataset"])
    if decode == "gpu":
        if not isinstance(transform, FastTrainTransform):
            raise DataError(f"data.decode=gpu decodes JPEG training data (imagenet, imagefolder) with the fast "
                            f"ImageNet transform (data.fast_decode=true); {index['dataset']} with {transform!r} "
                            "cannot: set data.decode=cpu")
        decoder = _GpuDecoder(shard_dir, index, "train", transform, simplejpeg=True)
        device_decode = DeviceDecode(transform, device)
    else:
        decoder = _Decoder(shard_dir, index, "train", transform, simplejpeg=True)
    if cursor is not None and int(cursor["step"]) != start_step:
        raise DataError(f"the data cursor is at step {cursor['step']}, the loader starts at {start_step}")
    if cursor is not None and cursor.get("worker", rank) != rank:  # positions are of one worker's own chunks
        raise DataError(f"the data cursor is worker {cursor['worker']}'s, this loader is worker {rank}'s")
    steps = _TrainSteps(decoder, [chunk_ids[i] for i in keep], kept, seed, rank, (part, k), keep, cursor)
    return RankLoader(steps, epoch_steps, start_step, num_workers, pin_memory, device_decode=device_decode)


def _check_share(share) -> tuple[int, int]:
    """(l, k) as ints if 0 <= l < k and k >= 1, else DataError (one line naming the fix)."""
    try:
        part, k = share
    except (TypeError, ValueError):
        raise DataError(f"share {share!r} is invalid: give (index, count), e.g. (0, 1) for one rank per "
                        "worker or (local_rank, ranks_per_node)") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (part, k)):
        raise DataError(f"share {share!r} is invalid: index and count must be integers, e.g. "
                        "(local_rank, ranks_per_node)")
    if k < 1:
        raise DataError(f"share {share!r} is invalid: the count (ranks per worker) must be >= 1")
    if not 0 <= part < k:
        raise DataError(f"share {share!r} is invalid: the index must be in 0..{k - 1} (the local rank in "
                        "its node)")
    return int(part), int(k)


class _EvalBatches(torch.utils.data.Dataset):
    """Batches of consecutive global ids start, start+1, ..., stop-1 of one split."""

    def __init__(self, decoder: _Decoder, batch_size: int, start: int, stop: int):
        self.decoder, self.batch_size = decoder, batch_size
        self.start, self.stop = start, stop
        self.n = stop - start

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, b: int):
        images, labels = [], []
        first, last = self.start + b * self.batch_size, min(self.stop, self.start + (b + 1) * self.batch_size)
        for gid in range(first, last):
            img = self.decoder.decode(gid)
            if img is not None:
                images.append(img)
                labels.append(int(self.decoder.labels[gid]))
        skipped = last - first - len(images)
        if not images:
            return None, None, skipped
        return self.decoder.batch(len(images), images), torch.tensor(labels, dtype=torch.long), skipped


class EvalLoader:
    """Finite iterable over a split (or one rank's slice of it), same order every call; corrupt
    samples are skipped. `sample_range` = (start, stop): the global ids this loader covers."""

    def __init__(self, batches: _EvalBatches, num_workers: int):
        self._batches, self.num_workers = batches, num_workers
        self.samples_skipped = 0  # over the last full pass
        self.num_samples = batches.n
        self.sample_range = (batches.start, batches.stop)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dl = torch.utils.data.DataLoader(self._batches, batch_size=None, shuffle=False,
                                         num_workers=self.num_workers)
        skipped = 0
        for images, labels, s in dl:
            skipped += int(s)
            if images is not None:
                yield images, labels
        self.samples_skipped = skipped


def eval_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous slice [start, stop) of n samples: [n*r//p, n*(r+1)//p). Over ranks
    0..p-1 the slices are disjoint, in order, and cover 0..n-1; their sizes differ by at most 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of {world_size} ranks")
    return n * rank // world_size, n * (rank + 1) // world_size


def make_eval_loader(shard_dir: str, batch_size: int, transform: Callable | None = None, split: str = "val",
                     num_workers: int = 0, verify: bool = True, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Loader over the samples of `split` in shard order (no augmentation by default).

    With ``world_size`` p > 1, rank r gets the contiguous slice eval_slice(n, r, p) = [r*n//p,
    (r+1)*n//p) of the n samples: the slices are disjoint and together are the whole split, in
    order (distributed evaluation sums the ranks' counts). world_size=1 is the whole split, as
    before. Only the shards that the slice touches are verified."""
    index = load_index(shard_dir)
    transform = transform or eval_transform(index["dataset"])
    decoder = _Decoder(shard_dir, index, split, transform)
    start, stop = eval_slice(len(decoder.labels), rank, world_size)
    if verify:
        shards = index["splits"][split]["shards"]
        ends = decoder.starts[1:]
        touched = [s["name"] for s, lo, hi in zip(shards, decoder.starts[:-1], ends) if lo < stop and hi > start]
        verify_shards(index, shard_dir, touched, split=split)
    return EvalLoader(_EvalBatches(decoder, batch_size, start, stop), num_workers)
