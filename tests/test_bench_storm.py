"""The storm bench's fault schedule (benchmarks/bench_storm.py): no launches, no namespaces."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_storm", os.path.join(ROOT, "benchmarks", "bench_storm.py"))
storm = importlib.util.module_from_spec(_spec)
sys.modules["bench_storm"] = storm  # its dataclass looks its module up
_spec.loader.exec_module(storm)


def test_the_same_seed_draws_the_same_storm_and_another_seed_another():
    a = storm.draw_schedule(120, 3600, 7, storm.KINDS, 4, max_down=2)
    assert a == storm.draw_schedule(120, 3600, 7, storm.KINDS, 4, max_down=2)
    assert a != storm.draw_schedule(120, 3600, 8, storm.KINDS, 4, max_down=2)
    assert all(0 < x.t < 3600 + 3600 for x in a) and [x.t for x in a] == sorted(x.t for x in a)


def test_arrivals_are_poisson_at_the_rate():
    # 200 hours at 120/h: 24000 +- 155 arrivals, exponential gaps of mean 30 s
    arrivals = storm.poisson_arrivals(120, 200 * 3600, 1)
    assert abs(len(arrivals) - 24000) < 5 * 155
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert abs(sum(gaps) / len(gaps) - 30) < 1
    assert sum(g > 60 for g in gaps) / len(gaps) == pytest.approx(0.135, abs=0.02)  # P(gap > 2 mean) = e^-2
    # the schedule's faults are at those arrivals, or held back from them, never earlier
    faults = storm.draw_schedule(120, 3600, 1, storm.KINDS, 4, max_down=2, start_s=20)
    firsts = [x for x in faults if not x.second]
    assert len(firsts) <= len(storm.poisson_arrivals(120, 3600, 1, 20))
    ts = storm.poisson_arrivals(120, 3600, 1, 20)
    assert all(x.t >= t for x, t in zip(firsts, ts))


def test_kinds_holds_and_nodes():
    faults = storm.draw_schedule(600, 5 * 3600, 3, ["crash", "freeze", "lighthouse"], 4, max_down=2)
    kinds = {x.kind for x in faults}
    assert kinds == {"crash", "freeze", "lighthouse"}
    for x in faults:
        lo, hi = storm.HOLD[x.kind]
        assert lo <= x.hold <= hi
        assert (x.node is None) == (x.kind == "lighthouse")
        assert x.node is None or 0 <= x.node < 4
    assert {x.node for x in faults if x.node is not None} == {0, 1, 2, 3}
    assert {x.kind for x in storm.draw_schedule(600, 3600, 3, ["partition"], 3)} == {"partition"}


@pytest.mark.parametrize("max_down", [1, 2, 3])
def test_never_more_than_max_down_nodes_down_or_healing(max_down):
    # a rate far above what the nodes can take: arrivals are held back, never stacked
    kinds = storm.KINDS if max_down >= 2 else storm.NODE_KINDS
    faults = storm.draw_schedule(3600, 3 * 3600, 5, kinds, 4, max_down=max_down, heal_s=30)
    assert storm.max_down_at_once(faults, 30) == max_down
    for i, x in enumerate(faults):  # no node takes a second fault while it is down or healing
        assert not [y for y in faults[max(0, i - 50):i] if y.node == x.node is not None and y.t <= x.t < y.end(30)]


def test_an_overlap_is_a_second_fault_on_another_node_while_the_first_heals():
    faults = storm.draw_schedule(240, 5 * 3600, 2, ["overlap"], 4, max_down=2, heal_s=30)
    seconds = [i for i, x in enumerate(faults) if x.second]
    assert seconds and len(seconds) * 2 == len(faults)
    for i in seconds:
        first, second = faults[i - 1], faults[i]
        assert not first.second and second.node != first.node
        assert first.t + first.hold < second.t < first.end(30)  # the first is back, still healing


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="kinds"):
        storm.draw_schedule(120, 600, 0, ["meteor"], 4)
    with pytest.raises(ValueError, match="max_down"):
        storm.draw_schedule(120, 600, 0, ["crash"], 4, max_down=4)
    with pytest.raises(ValueError, match="overlap"):
        storm.draw_schedule(120, 600, 0, ["overlap"], 4, max_down=1)


def test_bad_input_is_one_line_and_exit_2():
    bench = os.path.join(ROOT, "benchmarks", "bench_storm.py")
    for args, word in ((["--kinds", "meteor"], "--kinds"), (["--topology", "3x2", "--max-down", "3"], "--max-down"),
                       (["--rate", "0"], "--rate")):
        p = subprocess.run([sys.executable, bench, *args], capture_output=True, text=True)
        assert p.returncode == 2 and word in p.stderr, (args, p.stderr)
