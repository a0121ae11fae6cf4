"""Long work says where it is: the launcher reads the trainer's own progress bar from the log and
says which run of the launch is training, its step and the time left (issue 34 item 6)."""

from __future__ import annotations

import io

from risgd_tools.launch import Progress, _run_names


def _bar(name: str, step: int, steps: int, left: str) -> str:
    return f"{name}:  {100 * step // steps}%|####      | {step}/{steps} [00:10<{left}, 25.00it/s]\r"


def test_progress_names_the_run_its_step_and_the_time_left(tmp_path):
    log = tmp_path / "run.log"
    out = io.StringIO()
    watch = Progress(["demo-sync-s0", "demo-risgd-s0"], str(log), stream=out)
    log.write_text("DeepSpeed start-up lines\n")
    watch.poll()
    assert out.getvalue() == ""  # nothing training yet: nothing said
    with open(log, "a") as f:
        f.write(_bar("demo-sync-s0", 250, 1000, "00:30"))
    watch.poll()
    watch.poll()  # the same quarter: said once
    with open(log, "a") as f:
        f.write(_bar("demo-sync-s0", 1000, 1000, "00:00") + "\ndone: runs/demo-sync-s0\n")
        f.write(_bar("demo-risgd-s0", 500, 1000, "01:05"))
    watch.poll()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[run 1/2] demo-sync-s0: step 250/1000, 30 s left in it"
    assert lines[1].startswith("[run 2/2] demo-risgd-s0: step 500/1000, 1 min 05 s left in it, about 1 min 05 s "
                               "left in all")
    assert len(lines) == 2


def test_the_run_names_come_from_the_plan():
    assert _run_names([["algorithm=sync", "run_name=a"], ["run_name=b", "seed=1"]], ["steps=5"]) == ["a", "b"]
    assert _run_names(None, ["run_name=x"]) == ["x"]
    assert _run_names(None, []) == []


def test_watch_says_a_real_processes_progress_until_it_ends(tmp_path):
    """What the benchmarks and the namespace cluster use: a real child writing a trainer-like bar to its
    log, watched until it exits; its exit status is returned."""
    import subprocess
    import sys

    from risgd_common.progress import watch

    log = tmp_path / "child.log"
    code = ("import sys, time\n"
            "for step in (250, 500, 750, 1000):\n"
            f"    sys.stdout.write({_bar('gpu-check-cifar10', 0, 1, '00:00')!r}.replace('0/1', f'{{step}}/1000')"
            ".replace('0%', f'{step // 10}%'))\n"
            "    sys.stdout.flush(); time.sleep(0.3)\n"
            "sys.exit(3)\n")
    out = io.StringIO()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f)
        assert watch(proc, str(log), ["gpu-check-cifar10"], stream=out, every_s=0.1) == 3
    said = out.getvalue().splitlines()
    assert said and all(line.startswith("[run 1/1] gpu-check-cifar10: step ") for line in said)
    assert len(said) >= 2 and said[-1].split("step ")[1].startswith(("750/1000", "1000/1000"))


def test_runs_not_known_are_counted_without_a_total(tmp_path):
    """The namespace cluster reads host 0's log without the plan: no '[run 2/2]' it cannot know."""
    log = tmp_path / "host0.log"
    out = io.StringIO()
    watch = Progress([], str(log), stream=out)
    log.write_text(_bar("a", 500, 1000, "00:10"))
    watch.poll()
    with open(log, "a") as f:
        f.write(_bar("b", 250, 1000, "00:30"))
    watch.poll()
    assert out.getvalue().splitlines() == ["[run 1] a: step 500/1000, 10 s left in it",
                                           "[run 2] b: step 250/1000, 30 s left in it"]
