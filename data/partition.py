"""Split the training set into p balanced chunks D_0..D_{p-1}.

Global sample ids are positions in shard order. Because make_shards shuffles samples before
sharding, consecutive ids are already an iid sample, so an `iid` chunk is one contiguous id range
(it touches the fewest shards). Non-iid chunks are described per label: the segment
[from, to) of the ascending ids that carry that label. Both forms stay compact in the manifest.
Every scheme gives chunk sizes floor(N/p) or ceil(N/p): balanced within one sample, whatever p.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

SCHEMES = ("iid", "label_sorted", "dirichlet:ALPHA")


def chunk_sizes(n: int, p: int) -> np.ndarray:
    bounds = np.arange(p + 1) * n // p
    return np.diff(bounds)


def parse_scheme(scheme: str, spelled: str | None = None) -> tuple[str, float | None]:
    """Parse a --partition spelling: ("iid", None), ("label_sorted", None) or ("dirichlet", ALPHA).

    The one parser of the spelling (the manifest validator uses it too); raises DataError (one
    line) for anything else, including dirichlet:ALPHA with ALPHA <= 0 or not a number. ``spelled``
    is how the caller's user wrote the value (default ``--partition 'VALUE'``, the data commands'
    flag; the trainer passes its recipe key, e.g. ``the override data.partition=bogus``).
    """
    if isinstance(scheme, str):
        if scheme in ("iid", "label_sorted"):
            return scheme, None
        if scheme.startswith("dirichlet:"):
            try:
                alpha = float(scheme.split(":", 1)[1])
            except ValueError:
                alpha = -1.0
            if 0 < alpha < float("inf"):
                return "dirichlet", alpha
    raise DataError(
        f"{spelled or f'--partition {scheme!r}'} is invalid: use iid, label_sorted or dirichlet:ALPHA with ALPHA > 0"
    )


def _counts_dirichlet(class_counts: np.ndarray, sizes: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    """Class-by-chunk count matrix with exact chunk sizes and Dirichlet(alpha) label mixes.

    Chunks are filled in order: each draws its label proportions, takes what is still available
    of each class, and tops up from the classes with the most samples left. The last chunk takes
    the remainder, so its mix is less skewed than the others'; sizes stay exact (balance first).
    """
    rng = np.random.default_rng([seed, 0xD1])
    left = class_counts.astype(np.int64).copy()
    m = np.zeros((len(class_counts), len(sizes)), dtype=np.int64)
    for j, size in enumerate(sizes):
        if j == len(sizes) - 1:
            take = left.copy()
        else:
            want = np.floor(rng.dirichlet(np.full(len(left), alpha)) * size).astype(np.int64)
            take = np.minimum(want, left)
            deficit = int(size - take.sum())
            while deficit > 0:
                room = left - take
                c = int(np.argmax(room))
                add = min(deficit, int(room[c]))
                take[c] += add
                deficit -= add
        m[:, j] = take
        left -= take
    return m


def _segments_from_counts(m: np.ndarray) -> list[list[list[int]]]:
    cum = np.concatenate([np.zeros((m.shape[0], 1), dtype=np.int64), np.cumsum(m, axis=1)], axis=1)
    return [
        [[c, int(cum[c, j]), int(cum[c, j + 1])] for c in range(m.shape[0]) if m[c, j] > 0]
        for j in range(m.shape[1])
    ]


def partition(labels: np.ndarray, p: int, scheme: str = "iid", seed: int = 0,
              num_classes: int | None = None) -> list[dict]:
    """Chunk definitions for p workers: [{"id", "samples", "runs"|"segments"}]."""
    kind, alpha = parse_scheme(scheme)
    n = len(labels)
    if not 1 <= p <= n:
        raise DataError(f"--workers {p} is invalid: must be between 1 and the {n} training samples")
    sizes = chunk_sizes(n, p)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    if kind == "iid":
        return [{"id": j, "samples": int(sizes[j]), "runs": [[int(bounds[j]), int(bounds[j + 1])]]}
                for j in range(p)]
    num_classes = num_classes or int(labels.max()) + 1
    class_counts = np.bincount(labels, minlength=num_classes)
    if kind == "label_sorted":
        # Sorted by label then id; chunk j takes positions bounds[j]:bounds[j+1] of that order.
        class_bounds = np.concatenate([[0], np.cumsum(class_counts)])
        m = np.zeros((num_classes, p), dtype=np.int64)
        for c in range(num_classes):
            lo, hi = class_bounds[c], class_bounds[c + 1]
            m[c] = np.clip(np.minimum(bounds[1:], hi) - np.maximum(bounds[:-1], lo), 0, None)
    else:
        m = _counts_dirichlet(class_counts, sizes, alpha, seed)
    return [{"id": j, "samples": int(sizes[j]), "segments": seg}
            for j, seg in enumerate(_segments_from_counts(m))]


def resolve_chunk(chunk: dict, labels: np.ndarray) -> np.ndarray:
    """Sorted global ids of one chunk definition."""
    return resolve_chunks([chunk], labels)[0]


def resolve_chunks(chunks: list[dict], labels: np.ndarray) -> list[np.ndarray]:
    """Sorted global ids of each chunk; labels are grouped once (ImageNet has 1000 classes)."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(int(labels.max(initial=0)) + 2))
    out = []
    for chunk in chunks:
        if "runs" in chunk:
            out.append(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in chunk["runs"]]))
        else:
            parts = [order[starts[c]:starts[c + 1]][a:b] for c, a, b in chunk["segments"]]
            out.append(np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64))
    return out
