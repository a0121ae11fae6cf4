"""The GPU decode path of the ImageNet train loader (recipe key ``data.decode: gpu``).

With ``decode="gpu"`` the loader's workers decode no pixels: for each sample they read the encoded
JPEG, parse its header (simplejpeg, else PIL: no pixels), and draw the crop, flip and ColorJitter by
FastTrainTransform.sample_params under the same per-sample seed as the CPU path, so the same
(seed, rank, step) gives the same crops, flips and jitters on both paths. A batch leaves the
worker encoded (:class:`EncodedBatch`: the JPEG bytes packed in one uint8 tensor, the draws as a
float64 table, the labels), a few hundred kB instead of 150 MB of float pixels, and
:class:`DeviceDecode` turns it into the normalized [B, 3, H, W] float32 batch on the device:

1. ``torchvision.io.decode_jpeg(list of CPU uint8 tensors, mode=RGB, device=device)`` (nvJPEG's
   batched decode on CUDA; libjpeg-turbo with device="cpu", which is how CI tests this code);
2. per image: the crop box sliced at full resolution and torch's antialiased bilinear resize
   (the CPU path's filter at r = 1), rounded to integer levels as the CPU path's uint8 resize is;
3. batched: flip, then ColorJitter in each sample's own random order with PIL's arithmetic
   (float32 blend, truncation, PIL's integer luma and rounded mean), then ToTensor and Normalize:
   given the same resized crop, these are the CPU path's bits (tested).

What differs from the CPU path: the decoder (nvJPEG vs libjpeg-turbo: a level or two), the resize
rounding (float vs torch's uint8 kernel: at most one level before the jitter), and crops the CPU
path decodes at a reduced DCT scale (crop >= 2x the output size on both sides: never on shards made
with ``make_shards --max-side 320``), which here are resized from the full-resolution decode.

Samples the GPU path does not take (not a JPEG, CMYK/YCCK, no end-of-image marker, e.g. truncated)
are decoded in the worker by the CPU path itself, into ``EncodedBatch.ready``: their pixels, and
which corrupt samples are skipped and replaced, are exactly the CPU path's. An image nvJPEG still
refuses is decoded on the CPU by torchvision and moved to the device.

The package needs no GPU: :func:`check_decode` refuses ``gpu`` in one line where CUDA is not
available (the trainer calls it through trainer.run_config.resolve_run, before any process group).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .transforms import FastTrainTransform, TrainParams, _simplejpeg

DECODES = ("cpu", "gpu")
_GPU_COLORSPACES = ("YCbCr", "Gray")  # simplejpeg's names; CMYK / YCCK go through the CPU path
# one row of EncodedBatch.params: top, left, height, width, flip, order[0..3], brightness, contrast, saturation
_NPARAMS = 12


def check_decode(decode: str, cuda_available: bool | None = None) -> None:
    """DataError (one line) unless ``decode`` is cpu, or gpu on a machine where CUDA is available."""
    if decode not in DECODES:
        raise DataError(f"data.decode must be cpu or gpu, got {decode!r}")
    if decode == "gpu":
        ok = torch.cuda.is_available() if cuda_available is None else cuda_available
        if not ok:
            raise DataError("data.decode=gpu but CUDA is not available on this machine: set data.decode=cpu "
                            "(the loader's workers decode) or run on a GPU node")


def _params_row(p: TrainParams) -> list[float]:
    # A jitter component that is None is a blend with factor 1.0: the identity, bit for bit.
    def f(v):
        return 1.0 if v is None else float(v)
    return [p.top, p.left, p.height, p.width, float(p.flip), *p.order, f(p.brightness), f(p.contrast),
            f(p.saturation)]


def gpu_decodable(raw: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that the GPU path decodes (baseline or progressive, YCbCr or grey,
    ending with its end-of-image marker), from its header only; None for anything else."""
    if raw[:3] != b"\xff\xd8\xff" or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    sj = _simplejpeg()
    if sj is not None:
        try:
            height, width, colorspace, _ = sj.decode_jpeg_header(raw)
        except ValueError:
            return None
        return (width, height) if colorspace in _GPU_COLORSPACES else None
    try:
        im = Image.open(io.BytesIO(raw))  # the header only: no pixels are decoded
    except Exception:
        return None
    return im.size if im.format == "JPEG" and im.mode in ("RGB", "L") else None


class EncodedBatch(dict):
    """One step's batch as it leaves a loader worker (a dict of CPU tensors: pinned and shared like
    any batch): ``data`` the JPEG bytes of the GPU-decoded samples, concatenated (uint8);
    ``sizes`` their byte sizes; ``slots`` their positions in the batch; ``params`` their draws
    (float64 [n, 12]); ``ready`` the samples the CPU path decoded in the worker ([m, 3, H, W]) and
    ``ready_slots`` their positions; ``shape`` [B, 3, H, W] of the decoded batch."""

    @property
    def batch_size(self) -> int:
        return int(self["shape"][0])


class EncodedSlots:
    """What the loader's step fills, slot by slot, in a worker (see loader._GpuDecoder)."""

    def __init__(self, n: int, size: tuple[int, int]):
        self.n, self.size = n, size
        self.raws: list[bytes] = []
        self.slots: list[int] = []
        self.params: list[list[float]] = []
        self.ready: list[torch.Tensor] = []
        self.ready_slots: list[int] = []

    def __getitem__(self, slot: int) -> tuple[EncodedSlots, int]:
        return self, slot

    def finish(self) -> EncodedBatch:
        data = np.frombuffer(b"".join(self.raws), dtype=np.uint8) if self.raws else np.empty(0, np.uint8)
        ready = torch.stack(self.ready) if self.ready else torch.empty((0, 3, *self.size))
        return EncodedBatch(
            data=torch.from_numpy(data.copy()), sizes=torch.tensor([len(r) for r in self.raws], dtype=torch.long),
            slots=torch.tensor(self.slots, dtype=torch.long),
            params=torch.tensor(self.params, dtype=torch.float64).reshape(-1, _NPARAMS),
            ready=ready, ready_slots=torch.tensor(self.ready_slots, dtype=torch.long),
            shape=torch.tensor([self.n, 3, *self.size], dtype=torch.long))


def encode_sample(fast: FastTrainTransform, raw: bytes, out: tuple[EncodedSlots, int]) -> bool:
    """A loader worker's part for one sample (its seeds already set): header and draws for the GPU,
    or the CPU path's decode for what the GPU path does not take. False: undecodable (skipped)."""
    slots, slot = out
    size = gpu_decodable(raw)
    if size is None:
        img = fast.decode_bytes(raw)
        if img is None:
            return False
        slots.ready.append(img)
        slots.ready_slots.append(slot)
        return True
    p = fast.sample_params(*size)
    slots.raws.append(raw)
    slots.slots.append(slot)
    slots.params.append(_params_row(p))
    return True


@dataclass
class DeviceDecode:
    """EncodedBatch -> the normalized [B, 3, H, W] float32 batch on ``device`` (see the module doc).
    ``fast`` gives the output size, the normalization and the jitter's arithmetic."""

    fast: FastTrainTransform
    device: torch.device | str = "cuda"

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.mean = self.fast.mean.to(self.device).view(1, 3, 1, 1)
        self.std = self.fast.std.to(self.device).view(1, 3, 1, 1)

    def decode(self, enc: EncodedBatch) -> list[torch.Tensor]:
        """The [3, h, w] uint8 images of the GPU-decoded samples, on the device."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if enc["sizes"].numel() == 0:
            return []
        raws = list(torch.split(enc["data"], enc["sizes"].tolist()))
        try:
            return decode_jpeg(raws, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one image the device decoder refuses: each alone, the CPU where it must
            out = []
            for r in raws:
                try:
                    out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(decode_jpeg(r, mode=ImageReadMode.RGB).to(self.device))
            return out

    def resized_crops(self, images: list[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
        """The crops resized to the output size, integer levels as float32 [n, 3, H, W]."""
        size = self.fast.size
        out = torch.empty((len(images), 3, *size), dtype=torch.float32, device=self.device)
        for k, (img, row) in enumerate(zip(images, params.tolist())):
            top, left, h, w = (int(v) for v in row[:4])
            crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
            out[k] = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", antialias=True,
                                                     align_corners=False)[0]
        return out.round_().clamp_(0, 255)

    def finish(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip, ColorJitter (each sample's order and factors), ToTensor and Normalize, batched, with
        the CPU path's float32 arithmetic (transforms.FastTrainTransform._finish)."""
        n = x.shape[0]
        p = params.to(self.device)
        flip = p[:, 4].bool().view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        factors = p[:, 9:12].float()  # brightness, contrast, saturation: float32, as the CPU path's scalars
        order = p[:, 5:9].long()
        for t in range(4):
            for k in range(3):
                idx = (order[:, t] == k).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                v = x[idx]
                f = factors[idx, k].view(-1, 1, 1, 1)
                if k == 0:
                    v = v * f  # a blend with 0: 0 + f * (x - 0)
                else:
                    luma = _luma(v)
                    if k == 1:  # PIL: the mean of the L image, rounded to an integer (Python's float64)
                        total = luma.sum(dim=(1, 2, 3), dtype=torch.float32).double()
                        d = torch.floor(total / (v.shape[2] * v.shape[3]) + 0.5).float().view(-1, 1, 1, 1)
                    else:
                        d = luma
                    v = (v - d) * f + d
                x[idx] = v.clamp_(0, 255).trunc_()  # clamping changes nothing for 0 <= f <= 1
        return x.div_(255).sub_(self.mean).div_(self.std)

    def __call__(self, enc: EncodedBatch) -> torch.Tensor:
        out = torch.empty(tuple(enc["shape"].tolist()), dtype=torch.float32, device=self.device)
        if enc["slots"].numel():
            images = self.decode(enc)
            x = self.finish(self.resized_crops(images, enc["params"]), enc["params"])
            out[enc["slots"].to(self.device)] = x
        if enc["ready_slots"].numel():
            out[enc["ready_slots"].to(self.device)] = enc["ready"].to(self.device, non_blocking=True)
        return out


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L of integer-valued float32 images [n, 3, H, W]: (R*19595 + G*38470 + B*7471 +
    0x8000) >> 16. Every term is an integer below 2**24, exact in float32 (no matmul: no TF32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)
