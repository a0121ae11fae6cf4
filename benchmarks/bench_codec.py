"""The codecs' speed and bytes: encode + decode of a ResNet-50-sized payload on one core, and the
two-phase round's payload against fp32 at 2, 4, 8 and 16 ranks.

    .venv/bin/python benchmarks/bench_codec.py                 # 25.6 M values (ResNet-50), CPU, 1 thread
    .venv/bin/python benchmarks/bench_codec.py --device cuda   # the same code on the GPU (gpu_check lists it)

Each codec (``risgd_ext.codec.CODECS``) encodes and decodes the same fp32 values (log-uniform
magnitudes from 1e-5 to 1e-1, as a round's displacement has); the time is the median of --repeats,
with the spread; MB/s counts the fp32 input (4 bytes a value) per core (``torch.set_num_threads(1)``
on the CPU). The bytes are the registry's own counts (``two_phase_payload``: N chunk payloads with
their scales and padding), for one bucket of the engine's default 25 MiB.
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
    args = parser.parse_args(argv)
    if args.values < 1 or args.repeats < 1:
        print("error: --values and --repeats must be >= 1", file=sys.stderr)
        return 2

    import torch

    from risgd_ext.codec import CODECS, two_phase_payload

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
    print(f"{args.values:,} fp32 values ({mb:.1f} MB) on {args.device}"
          f"{' (1 thread)' if args.device == 'cpu' else ''}; median [min .. max] of {args.repeats}")
    print(f"{'codec':6s} {'encode+decode s':>24s} {'MB/s':>8s} {'max rel. error':>15s}")
    for name, codec in CODECS.items():
        if name == "none":
            continue
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            y = codec.decode(codec.encode(x), args.values)
            sync()
            times.append(time.perf_counter() - t0)
        err = ((y - x).abs().max() / x.abs().max()).item()
        med = statistics.median(times)
        print(f"{name:6s} {med:8.3f} [{min(times):.3f} .. {max(times):.3f}]  {mb / med:8.1f} {err:15.2e}")
    bucket = 25 * 2**20 // 4
    print("\nbytes of a two-phase round of one 25 MiB bucket against fp32 (fp32 / codec):")
    print(f"{'ranks':>5s} " + " ".join(f"{n:>7s}" for n in CODECS if n != "none"))
    for ranks in (2, 4, 8, 16):
        ratios = [4 * bucket / two_phase_payload(c, bucket, ranks) for n, c in CODECS.items() if n != "none"]
        print(f"{ranks:5d} " + " ".join(f"{r:6.2f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
