"""The codecs' speed and bytes: encode + decode of a ResNet-50-sized payload on one core, and the
two-phase round's payload against fp32 at 2, 4, 8 and 16 ranks.

    .venv/bin/python benchmarks/bench_codec.py                 # 25.6 M values (ResNet-50), CPU, 1 thread
    .venv/bin/python benchmarks/bench_codec.py --device cuda   # the same code on the GPU (gpu_check lists it)

Each codec (``risgd_ext.codec.CODECS``) encodes and decodes the same fp32 values (log-uniform
magnitudes from 1e-5 to 1e-1, as a round's displacement has), two ways, side by side:

- ``kept``: as the engine's round does it: the values in 25 MiB buckets, each cut into --ranks chunks
  (rows), encoded with ``encode_rows`` and decoded with ``decode_rows`` in buffers kept between rounds;
- ``one-shot``: ``encode``/``decode`` of the whole payload, which allocate their buffers each call.

The time is the median of --repeats, with the spread; MB/s counts the fp32 input (4 bytes a value)
per core (``torch.set_num_threads(1)`` on the CPU). The bytes are the registry's own counts
(``two_phase_payload``: N chunk payloads with their scales and padding), for one bucket of the
engine's default 25 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_codec.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=25_557_032, help="fp32 values (default: ResNet-50's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed encode+decode per codec (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--ranks", type=int, default=8, help="chunks per bucket in the kept path (default 8)")
    args = parser.parse_args(argv)
    if args.values < 1 or args.repeats < 1 or args.ranks < 1:
        print("error: --values, --repeats and --ranks must be >= 1", file=sys.stderr)
        return 2

    import torch

    from risgd_ext.codec import CODECS, chunk_len, two_phase_payload

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.values, generator=g) * 10 ** torch.empty(args.values).uniform_(-5, -1, generator=g))
    x = x.to(args.device)
    mb = 4 * args.values / 1e6
    bucket = 25 * 2**20 // 4

    def timed(fn) -> list[float]:
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    print(f"{args.values:,} fp32 values ({mb:.1f} MB) on {args.device}"
          f"{' (1 thread)' if args.device == 'cpu' else ''}; median [min .. max] of {args.repeats}; "
          f"kept: 25 MiB buckets of {args.ranks} chunks, buffers kept; one-shot: encode/decode of the whole")
    print(f"{'codec':6s} {'path':9s} {'encode+decode s':>24s} {'MB/s':>8s} {'max rel. error':>15s}")
    for name, codec in CODECS.items():
        if name == "none":
            continue
        pieces = [x[i:i + bucket] for i in range(0, args.values, bucket)]
        kept = []
        for piece in pieces:  # each bucket's rows and payloads, allocated once
            c = chunk_len(codec, piece.numel(), args.ranks)
            rows = torch.zeros(args.ranks, codec.padded(c), device=x.device)
            for k in range(args.ranks):  # chunk k in row k, zeros past its end (as the round lays it out)
                seg = piece[k * c:(k + 1) * c]
                rows[k, :seg.numel()].copy_(seg)
            payload = torch.empty(args.ranks, int(codec.nbytes(c)), dtype=torch.uint8, device=x.device)
            kept.append((c, rows, payload, torch.empty_like(rows), torch.empty_like(rows)))

        def kept_path(codec=codec, kept=kept):
            for c, rows, payload, tmp, out in kept:
                codec.encode_rows(rows, c, payload, tmp)
                codec.decode_rows(payload, c, out)

        one: dict = {}

        def one_shot(codec=codec, one=one):
            one["y"] = codec.decode(codec.encode(x), args.values)

        for path, fn in (("kept", kept_path), ("one-shot", one_shot)):
            fn()  # a warm-up: the kept buffers' first touch
            times = timed(fn)
            if path == "kept":
                err = max(((out - rows).abs().max() / rows.abs().max()).item() for _, rows, _, _, out in kept)
            else:
                err = ((one["y"] - x).abs().max() / x.abs().max()).item()
            med = statistics.median(times)
            print(f"{name:6s} {path:9s} {med:8.3f} [{min(times):.3f} .. {max(times):.3f}]  {mb / med:8.1f} {err:15.2e}")
    print("\nbytes of a two-phase round of one 25 MiB bucket against fp32 (fp32 / codec):")
    print(f"{'ranks':>5s} " + " ".join(f"{n:>7s}" for n in CODECS if n != "none"))
    for ranks in (2, 4, 8, 16):
        ratios = [4 * bucket / two_phase_payload(c, bucket, ranks) for n, c in CODECS.items() if n != "none"]
        print(f"{ranks:5d} " + " ".join(f"{r:6.2f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
