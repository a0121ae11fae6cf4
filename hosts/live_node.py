"""One node of a fault-tolerant run on the engine alone (``fault_tolerance: torchft``): a small model,
deterministic data per (node, step), one JSON line per step in ``--log``.

    TORCHFT_LIGHTHOUSE=http://HOST:PORT python -m risgd_hosts.live_node --worker 0 --workers 3 --port 29610 \\
        --steps 200 --tau 2 --log node0.jsonl

Started once per node (``--ranks K``: the node's DeepSpeed world of K ranks, spawned here); kill it
to lose the node, start it again to bring it back (it is healed from a live peer and goes on from the
live nodes' step). ``risgd_hosts.live_cluster`` starts and breaks nodes of it for the tests and
``benchmarks/bench_live.py``. Exit status 2 and one ``error:`` line when the run cannot go on (below
its floor, the lighthouse lost).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Environment: TORCHFT_LIGHTHOUSE.")
    p.add_argument("--worker", type=int, required=True, help="the manifest worker this node serves")
    p.add_argument("--workers", type=int, required=True, help="the run's workers (nodes)")
    p.add_argument("--ranks", type=int, default=1, help="ranks of this node (its DeepSpeed world)")
    p.add_argument("--port", type=int, required=True, help="this node's store port (MASTER_PORT)")
    p.add_argument("--addr", default="127.0.0.1", help="this node's address, reachable from the other nodes")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tau", type=int, default=2)
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--overlap-delay", type=int, default=0, help="risgd.overlap_delay")
    p.add_argument("--exit-after-step", type=int, default=-1, help="this node exits (code 0) after this step")
    p.add_argument("--fail-heal-round", action="store_true",
                   help="this node's first cross-node collective (its heal round, when it joins a run in progress) "
                        "raises once, as a transport error would")
    p.add_argument("--look", choices=["none", "view", "state"], default="none",
                   help="at every average step, look at the round in flight as an evaluation (view: averaged()) "
                        "or a checkpoint (state: state_dict()) does")
    p.add_argument("--warmup", type=int, default=0, help="risgd.warmup_sync_steps")
    p.add_argument("--compress", default="none")
    p.add_argument("--outer-lr", type=float, default=1.0, help="risgd.outer_lr")
    p.add_argument("--outer-momentum", type=float, default=0.0, help="risgd.outer_momentum")
    p.add_argument("--width", type=int, default=64, help="hidden width of the model (its size)")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep added to each step (paces the run)")
    p.add_argument("--op-timeout", type=float, default=2.0, help="risgd.op_timeout_s")
    p.add_argument("--min-nodes", type=int, default=1, help="risgd.min_nodes")
    p.add_argument("--floor-wait", type=float, default=30.0, help="risgd.floor_wait_s")
    p.add_argument("--quorum-timeout", type=float, default=30.0, help="risgd.quorum_timeout_s")
    p.add_argument("--freeze-at-round", type=int, default=-1,
                   help="freeze this whole node (SIGSTOP to its process group) inside the cross-node collective of "
                        "this round: a power cut mid-round, as seen by the others")
    p.add_argument("--drop-commit-at-round", type=int, default=-1,
                   help="this node's commit of this round fails once where the others' succeed (a split commit): it "
                        "is healed to the others' step at the next quorum")
    p.add_argument("--nudge-anchor", action="store_true",
                   help="move this node's anchor once it is live, as a node resumed from another timeline would hold")
    p.add_argument("--log", required=True, help="JSON lines: one per step (rank 0 of the node)")
    return p.parse_args(argv)


def _digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rank(local: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR=args.addr, MASTER_PORT=str(args.port), RANK=str(local), LOCAL_RANK=str(local),
                      WORLD_SIZE=str(args.ranks), LOCAL_SIZE=str(args.ranks))
    import torch

    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    import risgd_ext
    from risgd_ext.live import LiveError

    risgd_ext.init_distributed(timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, args.width), torch.nn.BatchNorm1d(args.width), torch.nn.ReLU(),
                                torch.nn.Linear(args.width, 3))
    block = {"tau": args.tau, "fault_tolerance": "torchft", "op_timeout_s": args.op_timeout,
             "min_nodes": args.min_nodes, "floor_wait_s": args.floor_wait, "quorum_timeout_s": args.quorum_timeout,
             "overlap": args.overlap, "compress": args.compress, "warmup_sync_steps": args.warmup,
             "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum, "overlap_delay": args.overlap_delay}
    if args.ranks > 1:
        block["node_size"] = args.ranks
    cfg = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.05,
           "momentum": 0.9}}, "steps_per_print": 10**9, "risgd": block}
    engine, *_ = risgd_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ctl = engine.risgd
    log = open(args.log, "a") if local == 0 else None

    def write(**record) -> None:
        if log is not None:
            log.write(json.dumps({"t": time.time(), "worker": args.worker, **record}) + "\n")
            log.flush()

    try:
        write(event="started")
        if args.fail_heal_round:
            _fail_first_collective(write)
        healed = ctl.go_live(args.worker, args.workers)
        if args.freeze_at_round >= 0 and local == 0:
            _freeze_in_round(ctl, args.freeze_at_round, write)
        if args.drop_commit_at_round >= 0:
            _drop_commit(ctl, args.drop_commit_at_round, write)
        if args.nudge_anchor:
            with torch.no_grad():
                ctl.model.anchors[0].add_(1e-3)
        start = ctl.take_healed() if healed else 0
        write(event="live", step=start, healed=healed, digest=_digest(engine.module) if healed else None)
        step = start
        while step < args.steps:
            step += 1
            g = torch.Generator().manual_seed(1000 * step + 17 * args.worker + local)
            x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            if args.step_seconds:
                time.sleep(args.step_seconds)
            if args.look != "none" and ctl.is_average():
                if args.look == "view":
                    with ctl.averaged():
                        write(event="viewed", step=step, digest=_digest(engine.module))
                else:
                    ctl.state_dict()
            healed_to = ctl.take_healed()  # behind the others at this round: healed to their step
            if healed_to is not None:
                write(event="healed", step=step, to=healed_to, digest=_digest(engine.module))
                step = healed_to
            record = {"step": step, "rounds": ctl.rounds, "retries": ctl.retries,
                      "members": sorted(ctl.members()), "quorum": ctl.live.current.quorum_id, "loss": loss.item()}
            if ctl.is_average() and ctl.in_flight is None:
                record["digest"] = _digest(engine.module)
            for e in ctl.take_events():
                write(event="membership", step=step, **e.__dict__)
            write(**record)
            if step == args.exit_after_step:
                write(event="exit", step=step)
                os._exit(0)
        ctl.consensus()
        write(event="done", step=args.steps, digest=_digest(engine.module), rounds=ctl.rounds,
              retries=ctl.retries, retry_seconds=ctl.retry_seconds)
    except LiveError as e:
        write(event="stopped", error=str(e))
        print(f"error: {e}" if local == 0 else f"error (rank {local} of the node): {e}", file=sys.stderr, flush=True)
        os._exit(2)
    ctl.live.shutdown()
    dist.destroy_process_group()


def _freeze_in_round(ctl, round_index: int, write) -> None:
    """SIGSTOP this node's process group at its first cross-node collective of round ``round_index``."""
    import signal

    def frozen(original):
        def op(*args, **kw):
            if ctl.rounds == round_index:
                write(event="freeze", round=round_index)
                os.killpg(os.getpgid(0), signal.SIGSTOP)
            return original(*args, **kw)
        return op

    for name in ("all_reduce", "all_to_all_single"):
        setattr(ctl.live, name, frozen(getattr(ctl.live, name)))


def _fail_first_collective(write) -> None:
    """The first cross-node collective of this node raises (before sending anything), once."""
    from risgd_ext.live import LiveNodes

    failed: list[str] = []

    def failing(original):
        def op(self, *args, **kw):
            if not failed:
                failed.append(original.__name__)
                write(event="heal round failed")
                raise RuntimeError("a transport error (injected by --fail-heal-round)")
            return original(self, *args, **kw)
        return op

    for name in ("all_reduce", "all_to_all_single"):
        setattr(LiveNodes, name, failing(getattr(LiveNodes, name)))


def _drop_commit(ctl, round_index: int, write) -> None:
    """This node's commit of round ``round_index`` (torchft's, which succeeded) reported failed, once."""
    commit, dropped = ctl.live.commit, []

    def dropping() -> bool:
        ok = commit()
        if ok and ctl.rounds == round_index and not dropped:
            dropped.append(round_index)
            write(event="commit dropped", round=round_index, step=ctl.steps)
            return False
        return ok

    ctl.live.commit = dropping


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ranks == 1:
        _rank(0, args)
        return 0
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank, args=(args,), nprocs=args.ranks, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
