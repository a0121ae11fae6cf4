"""Launch an elastic run on this node: torch's stock elastic agent (torchrun), with one line for what
it cannot survive.

    risgd-elastic --nnodes=2:3 --nproc-per-node=1 --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST0:29400 --rdzv-id=RUN -- --recipe digits mu=0.5 elastic.workers=3 ...

Everything before ``--`` is torchrun's own options (``torchrun --help``), everything after it the
trainer's (``risgd-train --help``); the trainer is run as ``--module risgd_trainer.train``. This is
torchrun itself (``torch.distributed.run.run``: its agent, its c10d rendezvous, its restarts), with
three things added:

- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` unless set: with torch 2.14's default, every restarted
  gloo group fails after a membership change (docs/faults.md, "Elastic runs").
- ``--rdzv-conf`` defaults ``last_call_timeout=5,keep_alive_interval=2`` unless given (torch's are
  30 s and 5 s: a lost node then holds the next rendezvous up for about 45 s).
- the end of the agent is one line on stderr and an exit status:

  ==  =====================================================================================
  0   the run finished
  2   the trainer refused to go on (the live workers below ``elastic.min_workers`` /
      ``elastic.min_coverage``, two nodes claiming one worker, a replica of no slot): its
      line, once, however many times torchrun restarted it
  1   the job cannot go on: the rendezvous host is lost, fewer than MIN nodes joined within
      ``join_timeout``, the rendezvous was closed by another node, or the workers kept failing
      until ``--max-restarts`` was used up
  ==  =====================================================================================

The latest checkpoint is kept in every case; the same command on every node resumes from it.
"""

from __future__ import annotations

import os
import sys
import tempfile

from risgd_trainer.elastic import STOP_FILE_ENV

from .launch import TRAINER

DEFAULT_RDZV_CONF = {"last_call_timeout": "5", "keep_alive_interval": "2"}


class LaunchError(Exception):
    """Bad arguments to this command (exit 2)."""


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, trainer arguments), split at the first ``--``."""
    if "--" not in argv:
        raise LaunchError("put the trainer's arguments after '--': risgd-elastic [torchrun options] -- --recipe R "
                          "key=value ...")
    cut = argv.index("--")
    torch_opts, trainer = argv[:cut], argv[cut + 1:]
    for opt in torch_opts:
        if opt in ("-m", "--module", "--no-python", "--no_python") or not opt.startswith("-"):
            raise LaunchError(f"'{opt}' before '--': risgd-elastic runs the trainer itself (--module "
                              f"{TRAINER}); give only torchrun's options before '--'")
    return torch_opts, trainer


def with_rdzv_defaults(torch_opts: list[str]) -> list[str]:
    """``torch_opts`` with DEFAULT_RDZV_CONF added to --rdzv-conf for each key not given."""
    out, given = [], {}
    it = iter(torch_opts)
    for opt in it:
        if opt.split("=", 1)[0] in ("--rdzv-conf", "--rdzv_conf"):
            value = opt.split("=", 1)[1] if "=" in opt else next(it, "")
            given.update(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
        else:
            out.append(opt)
    conf = {**DEFAULT_RDZV_CONF, **given}
    return [*out, "--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items())]


def _endpoint(args) -> str:
    return args.rdzv_endpoint or f"{args.master_addr or '127.0.0.1'}:{args.master_port}"


def _conf(args) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv)


def outcome(exc: BaseException | None, args, stop_line: str | None) -> tuple[int, str | None]:
    """(exit status, the one line) for how torchrun's agent ended: ``exc`` is what it raised."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.run import parse_min_max_nnodes

    if exc is None:
        return 0, None
    if stop_line:  # the trainer refused to go on: its own line
        return 2, stop_line
    endpoint, (min_nodes, _) = _endpoint(args), parse_min_max_nnodes(args.nnodes)
    keep = "the latest checkpoint is kept"
    if isinstance(exc, RendezvousTimeoutError):
        wait = _conf(args).get("join_timeout", "600")
        return 1, (f"error: elastic rendezvous {args.rdzv_id} at {endpoint}: fewer than {min_nodes} node(s) (the MIN "
                   f"of --nnodes={args.nnodes}) joined within join_timeout={wait} s; {keep}: start the missing nodes "
                   "with the same --rdzv-endpoint and --rdzv-id, or lower MIN")
    if isinstance(exc, RendezvousConnectionError):
        return 1, (f"error: the rendezvous host {endpoint} cannot be reached: an elastic run cannot survive the loss "
                   "of the node that hosts its c10d store (a single point, like torchft's Lighthouse); "
                   f"{keep}: start every node again with --rdzv-endpoint on a live node and the run resumes from "
                   "it (or use an external store: --rdzv-backend=etcd-v2)")
    if isinstance(exc, RendezvousClosedError):
        return 1, (f"error: elastic rendezvous {args.rdzv_id} at {endpoint} was closed by another node (it gave up "
                   f"or finished): see that node's log; {keep}")
    if isinstance(exc, RendezvousError):
        return 1, f"error: elastic rendezvous {args.rdzv_id} at {endpoint} failed: {exc}; {keep}"
    if isinstance(exc, ChildFailedError):
        rank, failure = min(exc.failures.items())
        how = (f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit status {failure.exitcode}")
        return 1, (f"error: the trainer failed on this node (rank {rank}: {how}) after torchrun's "
                   f"--max-restarts={args.max_restarts} restart(s); {keep}: its traceback is above")
    raise exc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: risgd-elastic [torchrun options] -- [trainer options]\n")
        print(__doc__.strip())
        return 0
    try:
        torch_opts, trainer = split_argv(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from torch.distributed.run import parse_args, run

    args = parse_args([*with_rdzv_defaults(torch_opts), "--module", TRAINER, *trainer])
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    fd, stop_file = tempfile.mkstemp(prefix="risgd-elastic-stop-", suffix=".txt")
    os.close(fd)
    os.environ[STOP_FILE_ENV] = stop_file  # inherited by the workers torchrun starts
    exc: BaseException | None = None
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # how the agent ended, told in one line below
        exc = e
    finally:
        with open(stop_file) as f:
            stop_line = f.read().strip() or None
        os.unlink(stop_file)
    status, line = outcome(exc, args, stop_line)
    if line:
        print(line, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
