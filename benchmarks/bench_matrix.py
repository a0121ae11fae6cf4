"""The whole composition matrix: every combination of the axes (layout x codec x overlap x outer step x
warm-up x fault and its phase), each run by the real engine on real gloo groups (4 CPU ranks at most)
and compared step by step with ``risgd_ext.reference``; prints what held, per axis value and case.

    .venv/bin/python benchmarks/bench_matrix.py              # the 600 cases (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_matrix.py --covering   # the suite's covering set only
    .venv/bin/python benchmarks/bench_matrix.py --json out.json

The suite (tests/test_reference.py) runs the covering set: every pair of axis values at least once.
Axes, tolerance and the cases' shape: ``risgd_hosts.matrix``. Exit status 1 when a case did not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_matrix.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covering", action="store_true", help="only the covering set (every pair of values)")
    parser.add_argument("--json", help="also write every case's axes and verdict here")
    args = parser.parse_args(argv)

    from risgd_hosts.matrix import AXES, cases_of, check, covering, exact, product, run_engine

    cases = cases_of(covering(AXES) if args.covering else product(AXES))
    print(f"{len(cases)} cases: {' x '.join(f'{k} ({len(v)})' for k, v in AXES.items())}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine = run_engine(cases)
    t_engine = time.perf_counter() - t0
    verdicts = check(cases, engine)
    t_check = time.perf_counter() - t0 - t_engine
    held = [c for c in cases if verdicts[c["name"]] is None]
    print(f"\n{len(held)} of {len(cases)} cases equal the reference at every step of every worker "
          f"({sum(exact(c) for c in held)} bitwise, the rest within rtol 1e-5: gloo's own order of more than "
          f"two fp32 sums); engine {t_engine:.0f} s, reference and comparison {t_check:.0f} s\n")
    print("| axis | value | held |")
    print("|---|---|---|")
    for axis, values in AXES.items():
        for v in values:
            mine = [c for c in cases if c["axes"][axis] == v]
            print(f"| {axis} | {v} | {sum(verdicts[c['name']] is None for c in mine)}/{len(mine)} |")
    failed = [c for c in cases if verdicts[c["name"]] is not None]
    for c in failed:
        print(f"did not hold: {c['axes']}: {verdicts[c['name']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**c["axes"], "held": verdicts[c["name"]] is None, "where": verdicts[c["name"]],
                        "bitwise": exact(c)} for c in cases], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
