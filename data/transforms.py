"""Train / eval transforms per dataset (PIL image in, normalized float tensor out).

The randomness these draw comes from Python's `random` (timm) and torch's global generator
(torchvision); the loader reseeds both per sample from (seed, rank, step, position), which is what
makes augmented batches reproducible and resumable.

ImageNet-format training data (imagenet, imagefolder) gets FastTrainTransform by default: timm's
train transform fused with the JPEG decode (encoded bytes in), with the same random draws, DCT-scaled
decoding where the crop allows it, and simplejpeg as the decoder when installed.
train_transform(..., fast=False) (train.py: the recipe key data.fast_decode) gives timm's transform
itself; RISGD_FAST_DECODE=0 sets the default of callers that pass no `fast`. digits and CIFAR are untouched.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from risgd_common.install import need

T = need("torchvision.transforms", "transforming images for training (risgd_data.transforms)")

DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)  # load_digits pixels / 16
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TIMM_DATASETS = ("imagenet", "imagefolder")


def image_mode(dataset: str) -> str:
    """PIL mode the loader converts decoded images to before the transform."""
    return "L" if dataset == "digits" else "RGB"


def _check(dataset: str) -> None:
    if dataset not in ("digits", *CIFAR_STATS, *TIMM_DATASETS):
        raise ValueError(f"no transforms for dataset {dataset!r}")


def train_transform(dataset: str, image_size: int | None = None, fast: bool | None = None) -> Callable:
    """digits: none; CIFAR: pad 4 + random crop 32 + flip; ImageNet/imagefolder: timm's RRC + flip +
    ColorJitter + normalize.

    ImageNet/imagefolder (JPEG training data): `fast=None` (default) gives the FastTrainTransform
    below, the same transform fused with a faster decode, unless RISGD_FAST_DECODE=0; `fast=False`
    gives timm's transform itself (the slow path); `fast=True` insists on the fast one. digits and
    CIFAR ignore `fast`: their transforms are never changed.
    """
    _check(dataset)
    if dataset == "digits":
        return eval_transform(dataset, image_size)
    if dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[dataset]
        size = image_size or 32
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    from timm.data import create_transform

    slow = create_transform(image_size or 224, is_training=True)
    if fast is False or (fast is None and not fast_decode_default()):
        return slow
    try:
        return FastTrainTransform(slow)
    except ValueError:
        if fast:
            raise
        return slow  # a timm version whose pipeline the fast path does not know: the slow path


def eval_transform(dataset: str, image_size: int | None = None) -> Callable:
    """digits / CIFAR: normalize only; ImageNet/imagefolder: timm resize + center crop."""
    _check(dataset)
    if dataset == "digits":
        resize = [T.Resize(image_size)] if image_size else []
        return T.Compose([*resize, T.ToTensor(), T.Normalize(DIGITS_MEAN, DIGITS_STD)])
    if dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[dataset]
        resize = [T.Resize(image_size)] if image_size and image_size != 32 else []
        return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform

    return create_transform(image_size or 224, is_training=False)


# ---------------------------------------------------------------- the fast ImageNet train path

FAST_DECODE_ENV = "RISGD_FAST_DECODE"  # "0" turns the fast path off wherever train_transform builds it
_DECODERS = ("auto", "simplejpeg", "pil")


def fast_decode_default() -> bool:
    """True unless the environment variable RISGD_FAST_DECODE is 0 / false / no / off."""
    return os.environ.get(FAST_DECODE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


_SJ: list = []  # [module or None] once looked up


def _simplejpeg():
    """The simplejpeg module, or None where it is not installed (optional: PIL decodes instead)."""
    if not _SJ:
        try:
            import simplejpeg
        except ImportError:
            simplejpeg = None
        _SJ.append(simplejpeg)
    return _SJ[0]


def decode_jpeg_rgb(raw: bytes) -> np.ndarray | None:
    """An RGB JPEG decoded by simplejpeg (libjpeg-turbo, ISLOW IDCT, fancy upsampling: the same
    pixels as PIL's decode, tested), or None when simplejpeg is missing or refuses it (not a JPEG,
    CMYK, data it is strict about): the caller then decodes with PIL."""
    sj = _simplejpeg()
    if sj is None or raw[:3] != b"\xff\xd8\xff":
        return None
    try:
        return sj.decode_jpeg(raw, colorspace="RGB")
    except ValueError:
        return None


@dataclass(frozen=True)
class TrainParams:
    """The random draws of one sample of timm's train transform, in the order it makes them."""

    top: int
    left: int
    height: int
    width: int  # the crop, in full-resolution pixels (RandomResizedCrop.get_params)
    flip: bool
    order: tuple[int, ...]  # ColorJitter's random order of its adjustments: 0 brightness, 1 contrast, 2 saturation
    brightness: float | None
    contrast: float | None
    saturation: float | None


class FastTrainTransform:
    """timm's ImageNet train transform fused with the JPEG decode, with the same random draws.

    The slow path decodes the whole JPEG, then RandomResizedCrop (PIL bilinear) -> flip -> ColorJitter
    (PIL ImageEnhance) -> ToTensor -> Normalize. Here, from the encoded bytes:

    1. The image size comes from the JPEG header; the crop is drawn on that full-resolution size by
       the slow transform's own RandomResizedCrop.get_params (torchvision's algorithm, on Python's
       `random`), then the flip and ColorJitter draws come from torch's generator exactly as the slow
       path makes them. The same seeds give the same crop, flip and jitter, and leave both
       generators in the same state (tested).
    2. The JPEG is decoded at the largest reduction r in {8, 4, 2, 1} that still leaves the crop
       region >= the output size (DCT scaling: simplejpeg's min_factor, or PIL's draft mode), and the
       crop is resized to the output size: at full resolution by slicing the crop and torch's
       antialiased bilinear resize on uint8 (PIL's filter, within a level or two of PIL's result,
       and faster); on a reduced image by PIL's bilinear resize of the crop box mapped there (it is
       fractional: pixel k of a 1/r decode covers full-resolution [k*r, (k+1)*r)).
    3. Flip, then ColorJitter computed as PIL computes it (float32 blend, truncation to integers,
       PIL's integer luma and rounded mean), then ToTensor and Normalize as torchvision does them.
       Given the same resized crop, these steps reproduce the slow path's bits.

    Decoder: simplejpeg (libjpeg-turbo; optional dependency) if importable, else PIL. Whatever
    simplejpeg refuses (CMYK, PNG, data it is strict about) goes through PIL; what PIL cannot decode
    gives None (the loader skips the sample, as on the slow path). `counts` (this process): decoded,
    reduced (decoded at r > 1), pil. Scratch buffers are reused between calls: one instance per
    thread (DataLoader workers are processes, each with its own copy).
    """

    takes_bytes = True  # the loader hands decode_bytes() the encoded image instead of a PIL image

    def __init__(self, slow: Callable, decoder: str = "auto"):
        from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation

        parts = list(getattr(slow, "transforms", []))
        kinds = (RandomResizedCropAndInterpolation, T.RandomHorizontalFlip, T.ColorJitter, MaybeToTensor,
                 T.Normalize)
        if len(parts) != len(kinds) or not all(isinstance(p, k) for p, k in zip(parts, kinds)):
            raise ValueError(f"not timm's RandomResizedCrop/flip/ColorJitter/ToTensor/Normalize pipeline: {slow}")
        rrc, flip, jitter, _, norm = parts
        if rrc.interpolation != T.InterpolationMode.BILINEAR or jitter.hue is not None:
            raise ValueError("the fast path implements bilinear RandomResizedCrop and ColorJitter without hue")
        if decoder not in _DECODERS:
            raise ValueError(f"decoder {decoder!r}: use one of {_DECODERS}")
        sj = _simplejpeg() if decoder in ("auto", "simplejpeg") else None
        if decoder == "simplejpeg" and sj is None:
            raise ValueError("decoder='simplejpeg' but simplejpeg is not installed: pip install simplejpeg")
        self.slow, self.rrc, self.flip_p, self.jitter = slow, rrc, flip.p, jitter
        self._flip_p32 = float(np.float32(flip.p))
        ranges = (jitter.brightness, jitter.contrast, jitter.saturation)
        self._one_range = all(r is not None and list(r) == list(ranges[0]) for r in ranges)
        self.size = tuple(rrc.size)  # (height, width)
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
        self.decoder = "simplejpeg" if sj is not None else "pil"
        self.counts = {"decoded": 0, "reduced": 0, "pil": 0}
        self._init_scratch()

    def _init_scratch(self) -> None:
        # Reused between samples: fresh 0.5 MB buffers per image cost page faults (~15% of a decode).
        self._sj = _simplejpeg() if self.decoder == "simplejpeg" else None
        self._buf = np.empty(0, dtype=np.uint8)  # simplejpeg's output
        self._work = torch.ones((4, *self.size), dtype=torch.float32)  # R, G, B and a plane of ones
        self._rgb = self._work[:3]
        self._gray = torch.empty(self.size, dtype=torch.float32)
        self._luma_w = torch.tensor([[19595.0, 38470.0, 7471.0, 32768.0]]) / 65536
        self._sum_dtype = torch.float32 if 255 * self.size[0] * self.size[1] < 2**24 else torch.float64

    def __repr__(self) -> str:
        return f"FastTrainTransform(decoder={self.decoder!r}, slow={self.slow!r})"

    def __getstate__(self) -> dict:  # DataLoader workers (spawn): no module, no scratch buffers
        scratch = ("_sj", "_buf", "_work", "_rgb", "_gray", "_luma_w", "_sum_dtype")
        return {k: v for k, v in self.__dict__.items() if k not in scratch}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_scratch()

    # ---- the random draws

    def sample_params(self, width: int, height: int) -> TrainParams:
        """Draw one sample's crop, flip and jitter for a width x height image, consuming Python's
        `random` and torch's default generator exactly as the slow transform does (tested)."""
        i, j, h, w = self.rrc.get_params(_SizeOnly(width, height), self.rrc.scale, self.rrc.ratio)
        # RandomHorizontalFlip: torch.rand(1) < p, compared in float32 as the tensor comparison does.
        flip = torch.rand(1).item() < self._flip_p32
        cj = self.jitter
        if self._one_range:  # ColorJitter.get_params' draws, with fewer torch calls (the same numbers)
            order = tuple(torch.randperm(4).tolist())
            b, c, s = torch.empty(3).uniform_(cj.brightness[0], cj.brightness[1]).tolist()
        else:
            perm, b, c, s, _ = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
            order = tuple(perm.tolist())
        return TrainParams(i, j, h, w, flip, order, b, c, s)

    def reduction(self, p: TrainParams) -> int:
        """Largest r in 8, 4, 2, 1 with the crop still >= the output size after decoding at 1/r."""
        out_h, out_w = self.size
        for r in (8, 4, 2):
            if p.height >= r * out_h and p.width >= r * out_w:
                return r
        return 1

    # ---- entry points

    def decode_bytes(self, raw: bytes, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Encoded image -> normalized [3, H, W] float32 tensor (written into `out` if given, e.g. a
        slot of the batch); None if it cannot be decoded."""
        sj = self._sj
        if sj is None or raw[:3] != b"\xff\xd8\xff":
            return self._pil_bytes(raw, None, out)
        try:
            height, width = sj.decode_jpeg_header(raw)[:2]
        except ValueError:
            return self._pil_bytes(raw, None, out)
        p = self.sample_params(width, height)
        r = self.reduction(p)
        dh, dw = -(-height // r), -(-width // r)
        if self._buf.size < dh * dw * 3:
            self._buf = np.empty(dh * dw * 3, dtype=np.uint8)
        try:
            arr = sj.decode_jpeg(raw, colorspace="RGB", min_factor=r, min_height=dh, min_width=dw, buffer=self._buf)
        except ValueError:  # e.g. CMYK, or data simplejpeg is strict about: PIL decides, as on the slow path
            return self._pil_bytes(raw, p, out)
        if arr.shape != (dh, dw, 3):  # not the reduction asked for
            return self._pil_bytes(raw, p, out)
        self.counts["decoded"] += 1
        self.counts["reduced"] += r > 1
        return self._finish(arr, p, r, out)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """An already decoded PIL image (no reduction possible): the same draws and arithmetic."""
        p = self.sample_params(*img.size)
        return self._finish(np.array(img if img.mode == "RGB" else img.convert("RGB")), p, 1, None)

    # ---- internals

    def _pil_bytes(self, raw: bytes, p: TrainParams | None, out: torch.Tensor | None) -> torch.Tensor | None:
        try:
            for attempt in (0, 1):
                im = Image.open(io.BytesIO(raw))  # in memory: nothing to close
                width, height = im.size
                if p is None:
                    p = self.sample_params(width, height)
                r = self.reduction(p) if im.format == "JPEG" and attempt == 0 else 1
                if r > 1:
                    im.draft("RGB", (width // r, height // r))  # DCT scaling by exactly r: size >= r * 224
                if im.size == (-(-width // r), -(-height // r)):
                    break  # else: not the reduction asked for, decode again in full
            im.load()  # the whole decode: truncation shows up here, as on the slow path
            img = im if im.mode == "RGB" else im.convert("RGB")
            arr = np.array(img) if r == 1 else img
        except Exception:  # any decoder error means a corrupt sample: the loader skips it
            return None
        self.counts["decoded"] += 1
        self.counts["reduced"] += r > 1
        self.counts["pil"] += 1
        return self._finish(arr, p, r, out)

    def _finish(self, img: np.ndarray | Image.Image, p: TrainParams, r: int,
                out: torch.Tensor | None) -> torch.Tensor:
        # Few torch calls: each costs ~10 us of dispatch here, as much as a pass over the pixels.
        out_h, out_w = self.size
        if r == 1:  # whole pixels: slice the crop, then torch's antialiased bilinear (PIL's filter)
            crop = np.ascontiguousarray(img[p.top:p.top + p.height, p.left:p.left + p.width])
            x = torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None], size=self.size,
                                                mode="bilinear", antialias=True, align_corners=False)[0]
        else:  # the crop box is fractional in a 1/r decode: PIL's bilinear resize takes such a box
            img = img if isinstance(img, Image.Image) else Image.fromarray(img)
            box = (p.left / r, p.top / r, (p.left + p.width) / r, (p.top + p.height) / r)
            x = torch.from_numpy(np.array(img.resize((out_w, out_h), Image.BILINEAR, box=box))).permute(2, 0, 1)
        if p.flip:
            x = x.flip(-1)
        f = self._rgb
        f.copy_(x)  # uint8 values, exact in float32
        for k in p.order:
            if k == 0 and p.brightness is not None:
                _blend_(f, 0.0, p.brightness)
            elif k == 1 and p.contrast is not None:  # PIL: the mean of the L image, rounded to an integer
                total = self._luma().sum(dtype=self._sum_dtype)  # integers: float32 is exact below 2**24
                _blend_(f, float(int(float(total) / (out_h * out_w) + 0.5)), p.contrast)
            elif k == 2 and p.saturation is not None:
                _blend_(f, self._luma(), p.saturation)
        f.div_(255).sub_(self.mean)  # ToTensor, then Normalize's sub_ and div_, as torchvision
        return torch.div(f, self.std, out=out if out is not None else torch.empty_like(f))

    def _luma(self) -> torch.Tensor:
        """PIL's RGB -> L of the work image: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as one
        matrix product with weights / 2**16 (the constant fourth plane of ones adds the 0x8000) and a
        floor. Every product and partial sum is a multiple of 2**-16 below 256, which float32 holds
        exactly, so the product is exact whatever the summation order."""
        g = self._gray
        torch.mm(self._luma_w, self._work.view(4, -1), out=g.view(1, -1))
        return g.floor_()


class _SizeOnly(Image.Image):
    """A PIL image that has a size and no pixels: what RandomResizedCrop.get_params reads."""

    def __init__(self, width: int, height: int):
        super().__init__()
        self._size = (width, height)


def _blend_(x: torch.Tensor, degenerate: float | torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) in place, as PIL computes it: float32
    d + factor * (x - d), truncated to an integer; outside 0 <= factor <= 1 clipped to [0, 255] first."""
    if isinstance(degenerate, torch.Tensor) or degenerate != 0.0:
        x.sub_(degenerate).mul_(factor).add_(degenerate)
    else:
        x.mul_(factor)  # 0 + factor * (x - 0): the same float32 value
    if not 0.0 <= factor <= 1.0:
        x.clamp_(0, 255)
    return x.trunc_()
