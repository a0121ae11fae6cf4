"""Start one node of an elastic run: torchrun on this node alone, its ranks the trainer's, meeting the
other nodes in torchft's quorum.

    risgd-elastic --nproc-per-node 8 --master-addr THIS_NODE --lighthouse http://LIGHTHOUSE:29510 -- \\
        --recipe imagenet_resnet50 elastic.workers=8 data.shards=/local/replica ...

Everything after ``--`` is the trainer's (``risgd-train --help``); it runs as ``--module
risgd_trainer.train`` under torch's stock launcher (``torch.distributed.run``) with ``--nnodes=1``:
this node's ranks are one DeepSpeed world and the node level of the run. The nodes never rendezvous
with each other through torchrun: a lost node is dropped at the next round by torchft's lighthouse
and the others go on; the same command started again (here or on a replacement with the lost node's
replica) is healed from a live peer (docs/elastic.md).

- ``--master-addr`` is the address the other nodes reach this one at (its store and torchft's
  servers are advertised there); ``--master-port`` its store's port.
- ``--lighthouse`` (or ``TORCHFT_LIGHTHOUSE``) is the run's ``torchft_lighthouse``.
- ``--max-restarts K`` lets torchrun restart this node's ranks when one crashes (K times); they
  come back healed from a live peer, as a new node would. The others never restart.
- ``--verbose`` shows torchft's own INFO lines (every quorum and commit; ``RISGD_VERBOSE=1`` does the
  same under any launcher). Without it a node prints torchft's warnings and errors only, and one line
  of the trainer's for each change of the live nodes (who left or joined, coverage, seconds lost).

Exit status: 0 the run finished; 2 bad input or the trainer refused (its one ``error:`` line above:
below the floor, the lighthouse lost, a worker already served); 1 this node's ranks failed.

torchrun's cross-node options (``--nnodes``, ``--rdzv-*``, ``--standalone``), which would make one
torchrun agent span the nodes and restart them all when one is lost, are refused in one line with the
way over.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from risgd_common.cli import Parser

from .launch import TRAINER

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own variable
VERBOSE_ENV = "RISGD_VERBOSE"  # risgd_ext.live.VERBOSE_ENV: the ranks show torchft's INFO lines (read there)
RETIRED = ("--nnodes", "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id",
           "--rdzv_id", "--rdzv-conf", "--rdzv_conf", "--standalone")


class LaunchError(Exception):
    """Bad arguments to this command (exit 2)."""


def parse(argv: list[str]):
    """(this command's options, the trainer's arguments)."""
    if "--" not in argv:
        raise LaunchError("put the trainer's arguments after '--': risgd-elastic [options] -- --recipe R "
                          "elastic.workers=P key=value ...")
    cut = argv.index("--")
    own, trainer = argv[:cut], argv[cut + 1:]
    for opt in own:
        if opt.split("=", 1)[0] in RETIRED:
            raise LaunchError(f"{opt.split('=', 1)[0]}: risgd-elastic now starts one node of a run on torchft (the "
                              "torchrun path that restarted every node was retired): drop the --nnodes/--rdzv-* "
                              "options, pass --lighthouse URL, and start the command on every node "
                              "(docs/elastic.md)")
    args = parser().parse_args(own)
    args.lighthouse = args.lighthouse or os.environ.get(LIGHTHOUSE_ENV)
    if not args.lighthouse:
        raise LaunchError(f"no lighthouse: pass --lighthouse http://HOST:PORT or set {LIGHTHOUSE_ENV} (start one "
                          "with torchft_lighthouse; docs/elastic.md)")
    if args.nproc_per_node < 1 or args.max_restarts < 0:
        raise LaunchError("--nproc-per-node must be >= 1 and --max-restarts >= 0")
    if not any(a.startswith("elastic.workers=") for a in trainer):
        raise LaunchError("the trainer's arguments need elastic.workers=P (the run's nodes, one per manifest "
                          "worker): without it the launch is a fixed-size run of this node alone")
    check_port_free(args.master_addr, args.master_port)
    return args, trainer


def check_port_free(addr: str, port: int) -> None:
    """LaunchError when this node's store port is taken (another node on this machine, started without its own
    --master-port, took it: torchrun would die with a 30-line EADDRINUSE traceback)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a crashed node's TIME_WAIT is no owner
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(f"port {port} on {addr} is taken (another node on this machine?): give each node "
                                  "on one machine its own --master-port") from None
            # an address of another machine, or not bound here: torchrun reports it in its own words


def parser() -> Parser:
    p = Parser(prog="risgd-elastic", description="Start one node of an elastic run (torchft). "
               "Usage: risgd-elastic [options] -- --recipe R elastic.workers=P key=value ...")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="this node's ranks (default 1)")
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1",
                   help="this node's address, reachable from the other nodes (default 127.0.0.1: one machine)")
    p.add_argument("--master-port", "--master_port", type=int, default=29500, help="this node's store port")
    p.add_argument("--lighthouse", default=None, help=f"the run's torchft_lighthouse (default ${LIGHTHOUSE_ENV})")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="restart this node's ranks up to this many times when one crashes (default 0)")
    p.add_argument("--verbose", action="store_true",
                   help=f"show torchft's INFO lines, every quorum and commit (as {VERBOSE_ENV}=1 does; default: its "
                        "warnings and errors only)")
    return p


def torchrun_argv(args, trainer: list[str]) -> list[str]:
    """torchrun's arguments for this node."""
    return ["--nnodes=1", "--node-rank=0", f"--nproc-per-node={args.nproc_per_node}",
            f"--max-restarts={args.max_restarts}", f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}", "--module", TRAINER, *trainer]


LAUNCHER_ENV = "RISGD_LAUNCHER_PID"  # the launcher whose death a rank follows (risgd_trainer.train reads it)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        parser().print_help()
        print("\n" + __doc__.strip())
        return 0
    try:
        args, trainer = parse(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LIGHTHOUSE_ENV] = args.lighthouse
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    # torchrun starts each rank in a session of its own: a kill -9 of this launcher's process group would leave
    # the ranks training on, in the quorum. Each rank asks the kernel to kill it when this process dies.
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        run(parse_args(torchrun_argv(args, trainer)))
    except KeyboardInterrupt:
        return 130
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {2}:  # the trainer refused: its one line is above
            return 2
        rank, failure = min(e.failures.items())
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"error: this node's ranks failed (rank {rank}: {how}, after --max-restarts={args.max_restarts}); "
              "the other nodes go on without it: start the same command to bring it back", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
