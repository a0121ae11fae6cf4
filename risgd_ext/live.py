"""Who takes part in each round of a fault-tolerant run: torchft's lighthouse decides, here only.

A fault-tolerant run (``fault_tolerance: torchft``) is one DeepSpeed world per node (its ranks
started by the stock launcher on that node) and one torchft replica group per node. Every round
across nodes begins with a quorum (:meth:`LiveNodes.quorum`: torchft's ``Manager.start_quorum``,
the lighthouse's heartbeats and its join timeout); the cross-node collectives of the round run in
torchft's reconfigurable gloo process group of that quorum (rank l of every live node: the node
level's cross group l); the round is applied only if every rank of the node commits
(``Manager.should_commit``). Nothing here is a protocol of its own: membership, heartbeats,
rendezvous of the cross-node groups and the transfer of a live state to a joiner are torchft's.

What this layer adds to torchft (and why):

- **No window thrown away.** torchft's LocalSGD and DiLoCo drop a sync window whose all-reduce
  failed. Here a failed round is retried among the survivors at once, from the local models, which
  a fault-tolerant round never overwrites before it commits (its sum runs in scratch buffers).
- **Who contributes travels with the sum.** Each rank adds 1 (live) or 0 (a joiner being healed,
  or a node the ``failures`` schedule marks down) to a count summed with the round, so the average
  divides by exactly the contributions it holds, whatever the quorum looked like.
- **A silent peer costs a bounded wait.** gloo cannot abort a pending collective; each operation
  of the cross-node group has its own timeout (``op_timeout_s``, sized from the expected bucket
  time), after which the round fails and is retried in the next quorum, which the lighthouse has
  formed without the silent node (its heartbeat timeout). Building a quorum's group is bounded the
  same way (a member that asked for the quorum and was lost before it formed never comes).
- **The floor.** ``min_nodes`` live nodes (and the caller's ``accept`` check, e.g. the data
  coverage of the live nodes): below it the round waits, retrying the quorum, up to ``floor_wait_s``,
  then :class:`BelowFloor` is raised (the caller checkpoints and stops with one line). Checked by
  ``risgd_ext.membership`` only, which owns who is live; this module is torchft's side of it.
- **A lost lighthouse** (the single point of torchft) raises :class:`LighthouseLost` after ``quorum_timeout_s``;
  one started again on its address within that time is asked again (torchft's ``quorum_retries``,
  :func:`lighthouse_retries`), its first quorum waits for the last quorum's nodes, and the groups it builds
  under quorum ids an earlier lighthouse used do not read that one's addresses (a generation per prefix).
- **Healing from a snapshot.** torchft's HTTP transport serves CPU tensors by reference when the
  joiner asks; an overlapped peer is back at its local steps by then. What a peer serves is copied
  when its quorum takes it (:func:`snapshot`).
- **Who may join.** A node serving a worker a live node already serves is refused alone
  (:class:`DuplicateWorker`); nodes holding different anchors stop (:class:`AnchorsDiffer`, from the
  anchor votes each counted round carries: ``risgd_ext.round.anchor_vote``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own variable: the lighthouse's address, http://HOST:PORT
LIGHTHOUSE_PROBE_S = 10.0  # seconds a node waits for its lighthouse to answer at its start (torchft's connect timeout)
LIGHTHOUSE_RETRY_S = 1.0  # a quorum whose lighthouse call failed is asked again this often (quorum_timeout_s in all)
LIGHTHOUSE_REJOIN_S = 10.0  # a lighthouse started again: the last quorum's nodes are waited for this long (torchft's
# managers connect to it again on their own, each within its connect timeout, 10 s)
REPLICA_PREFIX = "w"  # a replica group's id: w<manifest worker>, so torchft's global ranks follow the data
VERBOSE_ENV = "RISGD_VERBOSE"  # 1: torchft's own INFO lines (every quorum and commit) are shown; else warnings only
TORCHFT_LOGGERS = ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors")  # its Python loggers
GENERATION_KEY, CONNECTED_KEY = "risgd_generation", "risgd_connected_"  # a group prefix's uses, on its store


class LiveError(RuntimeError):
    """A fault-tolerant run cannot go on (one line says why)."""


class BelowFloor(LiveError):
    """Fewer live nodes than the floor for longer than ``floor_wait_s``."""


class RunOver(LiveError):
    """The other nodes finished the run while this node was away (the caller's ``over`` says so): nothing is
    left for it to do. Not a failure: the caller exits 0 with the one line this carries."""


class LighthouseLost(LiveError):
    """The lighthouse cannot be reached: no quorum can be formed."""


class DuplicateWorker(LiveError):
    """This node serves a manifest worker another live node already serves."""


class AnchorsDiffer(LiveError):
    """The live nodes do not hold the same anchor (the last average) at a round."""


def worker_of_replica(replica_id: str) -> int:
    """The manifest worker of a replica id ``w<worker>[:uuid]``."""
    m = re.fullmatch(rf"{REPLICA_PREFIX}(\d+)", replica_id.split(":")[0])
    if m is None:
        raise ValueError(f"replica id {replica_id!r} is not {REPLICA_PREFIX}<worker>")
    return int(m.group(1))


@dataclass
class Quorum:
    """One quorum as this rank sees it."""

    quorum_id: int
    members: frozenset[int]      # manifest workers (nodes) in the quorum
    rank: int                    # this node's place in the cross-node group
    size: int                    # nodes in the cross-node group
    healing: bool                # this node receives the live state in this quorum (contributes 0)
    seconds: float               # how long the quorum took on this rank
    restarted: bool = False      # the first from a lighthouse started again (its quorum ids went back)


@dataclass
class MembershipEvent:
    """A change of the live nodes, seen at a round."""

    round: int
    quorum_id: int
    members: list[int]
    lost: list[int]
    joined: list[int]
    healed: bool                 # this node was healed from a peer in this quorum
    seconds: float               # the quorum's time on this rank
    failed_attempts: int = 0     # rounds of this step that failed before it committed
    attempt_seconds: float = 0.0  # seconds spent in those failed attempts


def _reconfigurable_gloo(timeout: datetime.timedelta):
    """torchft's ProcessGroupGloo, recording the quorum id and the global ranks of each configuration
    (torchft passes them to ``configure``, its process groups' public interface, and keeps them private
    in its manager: no private field of torchft is read here). ``quorum_id`` is -1 until the first."""
    from torchft.process_group import ProcessGroupGloo

    class Recorded(ProcessGroupGloo):
        members: list[int] = []
        rank: int = 0
        world: int = 1
        quorum_id: int = -1

        def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                      group_world_size=None, global_ranks=None):
            # recorded first, as torchft's manager records it before calling configure
            self.quorum_id = -1 if quorum_id is None else int(quorum_id)
            self.rank, self.world = rank, world_size
            self.members = list(global_ranks or [])
            # torchft's prefix is HOST:PORT/torchft/<quorum id>/<local rank>, and a lighthouse started again counts
            # its quorum ids from 1 again: gloo would read the addresses an earlier group left under that prefix on
            # the same store as this group's (connection refused, or a wait for a peer that connects elsewhere,
            # until the group's timeout). Each group built under a prefix gets a generation of its own, counted on
            # the store: bumped once every member has connected (none reads the old keys any more), or at a
            # member's failure (the group is lost).
            from torchft.process_group import create_store_client

            self.abort(errored=False)
            store = create_store_client(store_addr, timeout=self._timeout)
            generation = store.add(GENERATION_KEY, 0)
            try:
                super().configure(f"{store_addr}/g{generation}", replica_id, rank, world_size, quorum_id,
                                  group_rank, group_world_size, global_ranks)
            except Exception:
                with contextlib.suppress(Exception):  # the store may be what failed
                    store.add(GENERATION_KEY, 1)
                raise
            with contextlib.suppress(Exception):  # the group is built; only a later reuse of its prefix would miss it
                if store.add(f"{CONNECTED_KEY}{generation}", 1) == world_size:
                    store.add(GENERATION_KEY, 1)

    return Recorded(timeout=timeout)


def _addressed_http(host: str, timeout: datetime.timedelta):
    """torchft's HTTP checkpoint transport, advertised at ``host`` (a node's routable address)."""
    from torchft.checkpointing import HTTPTransport

    class Addressed(HTTPTransport):
        def address(self) -> str:
            return f"http://{host}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return Addressed(timeout=timeout, num_chunks=0)


@dataclass
class LiveNodes:
    """This rank's torchft manager and the cross-node group of its node's place ``local``.

    ``worker``: the manifest worker this node serves (its replica id); ``local``/``node_size``: this
    rank's place in its node (torchft's group rank and group world size); ``store``: the node's
    TCPStore (host, port), which the other nodes reach to rendezvous the cross-node group."""

    worker: int
    local: int
    node_size: int
    store: tuple[str, int]
    op_timeout_s: float
    quorum_timeout_s: float = 60.0
    lighthouse: str | None = None
    manager: Any = field(init=False, default=None)
    pg: Any = field(init=False, default=None)
    current: Quorum | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        torchft_logging()  # before torchft's first import: its Rust side reads RUST_LOG once, when it is loaded
        try:
            from torchft import Manager
        except ImportError:
            raise LiveError("fault_tolerance=torchft needs torchft: pip install 'torchft>=0.2,<0.3' (or the "
                            "package's [ft] extra)") from None

        address = self.lighthouse or os.environ.get(LIGHTHOUSE_ENV)
        if not address:
            raise LiveError(f"fault_tolerance=torchft needs the lighthouse's address: set {LIGHTHOUSE_ENV}="
                            "http://HOST:PORT on every node (start it with torchft_lighthouse, docs/elastic.md)")
        self.lighthouse = address
        # the lighthouse probed first (a mistyped or stopped one: one line, within LIGHTHOUSE_PROBE_S); a twin (a node
        # already serving this worker, heartbeating) is refused here, before it is in any quorum: no one waits
        if _worker_heartbeating(address, self.worker):
            raise DuplicateWorker(_TWIN.format(worker=self.worker))
        # the group's own timeout bounds building it: waiting for every member's address on the store, then
        # connecting every pair. These are cross-node operations like any other, bounded by op_timeout_s: every
        # member got the quorum at the same moment and builds the group at once, so one that has not come is
        # lost (a node that asked for the quorum and died before it formed). Bounded by quorum_timeout_s (60 s)
        # it cost the survivors a minute (the storm bench's defect 2); each operation carries op_timeout_s too
        self.pg = _reconfigurable_gloo(datetime.timedelta(seconds=self.op_timeout_s))
        # the address the other nodes reach this one at: the node's store host (MASTER_ADDR), for torchft's
        # manager server and its HTTP checkpoint server (torchft would advertise socket.gethostname())
        host = self.store[0]
        timeout = datetime.timedelta(seconds=max(self.op_timeout_s, 10.0))
        self.manager = Manager(
            pg=self.pg, load_state_dict=None, state_dict=None, min_replica_size=1, use_async_quorum=True,
            hostname=host, checkpoint_transport=_addressed_http(host, timeout),
            timeout=timeout,
            quorum_timeout=datetime.timedelta(seconds=self.quorum_timeout_s),
            connect_timeout=datetime.timedelta(seconds=10), rank=self.local, world_size=self.node_size,
            store_addr=self.store[0], store_port=self.store[1], lighthouse_addr=address,
            replica_id=f"{REPLICA_PREFIX}{self.worker}", init_sync=False,
            quorum_retries=lighthouse_retries(self.quorum_timeout_s))

    def register_state(self, key: str, load: Callable[[Any], None], save: Callable[[], Any]) -> None:
        """What a joiner receives from a live peer of its place (torchft's checkpoint transport), as
        it was when the peer's quorum took it: a copy. torchft's HTTP transport copies device tensors
        to the CPU at once but serves CPU tensors by reference when the joiner's request comes, and
        with overlap the peer is back at its local steps by then: the joiner got a torn state (found
        by bench_elastic: the rejoined node's final model differed in 2 of 6 runs of 2x2 with overlap)."""
        self.manager.register_state_dict_fn(key, load, lambda: snapshot(save()))

    # -- the quorum --------------------------------------------------------------------------------
    def quorum(self, step: int | None = None) -> Quorum:
        """The next quorum (blocking): the live nodes, the cross-node group rebuilt if they changed,
        and the live state fetched from a peer if this node is behind (applied at :meth:`commit`).
        ``step``: this node's step, as torchft compares them (None: as it stands)."""
        m = self.manager
        if step is not None:
            m.load_state_dict({"step": step, "batches_committed": 0})
        t0 = time.perf_counter()
        try:
            m.start_quorum(allow_heal=True, timeout=datetime.timedelta(seconds=self.quorum_timeout_s))
            m.wait_quorum()
        except Exception as e:  # the lighthouse (or this node's manager server) cannot form a quorum
            raise LighthouseLost(f"no quorum from the lighthouse at {self.lighthouse} ({_first_line(e)})") from e
        workers = [r // self.node_size for r in self.pg.members]
        members = frozenset(workers) or frozenset({self.worker})
        healing = not m.is_participating()
        if workers.count(self.worker) > 1 and (healing or m.num_participants() == len(workers)):
            # two nodes serve one worker (a replica copied twice, a node started twice): the one behind (a
            # joiner, healing) is refused alone and the run goes on; two at the same step cannot be told apart
            raise DuplicateWorker(_TWIN.format(worker=self.worker))
        restarted = self.current is not None and 0 <= self.pg.quorum_id < self.current.quorum_id
        q = Quorum(self.pg.quorum_id, members, self.pg.rank, self.pg.world, healing=healing,
                   seconds=time.perf_counter() - t0, restarted=restarted)
        self.current = q
        return q

    def report_error(self, error: BaseException) -> None:
        """A collective of this round failed: the node will not commit it."""
        self.manager.report_error(error if isinstance(error, Exception) else RuntimeError(str(error)))

    def commit(self) -> bool:
        """Whether every rank of this node completed the round (torchft's ``should_commit``); a
        joiner's live state, fetched during the quorum, is loaded here."""
        try:
            return self.manager.should_commit()
        except Exception as e:
            raise LighthouseLost(f"the round's commit failed ({_first_line(e)})") from e

    def shutdown(self) -> None:
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None

    # -- the cross-node group's collectives ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self.current.size if self.current is not None else 1

    @property
    def rank(self) -> int:
        return self.current.rank if self.current is not None else 0

    def _opts(self, cls):
        opts = cls()
        opts.timeout = datetime.timedelta(seconds=self.op_timeout_s)  # this operation's, not the group's
        return opts

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        from torch.distributed.distributed_c10d import AllreduceOptions, ReduceOp

        opts = self._opts(AllreduceOptions)
        opts.reduceOp = ReduceOp.SUM
        return _done(self.pg.allreduce([t], opts), async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        from torch.distributed.distributed_c10d import AllToAllOptions

        return _done(self.pg.alltoall_base(out, inp, [], [], self._opts(AllToAllOptions)), async_op)

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        from torch.distributed.distributed_c10d import AllgatherOptions

        parts = list(out.view(self.size, -1).unbind(0))
        return _done(self.pg.allgather([parts], [inp], self._opts(AllgatherOptions)), async_op)


def lighthouse_retries(quorum_timeout_s: float) -> int:
    """How many times torchft's manager server asks the lighthouse again for a quorum whose call failed
    (``quorum_retries``), so that it asks about every :data:`LIGHTHOUSE_RETRY_S` within ``quorum_timeout_s``.

    torchft's manager server (its Rust ``Manager::_quorum_with_retries``) asks the lighthouse once per quorum by
    default. When that call fails (the lighthouse killed: the connection reset), it gives up and never sends the
    quorum to the node's ranks (``_run_quorum`` returns before its broadcast: torchft's own "TODO: We don't
    broadcast in cases when this method returns an error, resulting in a hang"), so every rank waited out its
    whole ``quorum_timeout_s`` and stopped, even when the lighthouse was back on its address within seconds (the
    storm bench's defect 1). With retries it sleeps ``timeout / (retries + 1)`` after a failed call, connects
    again and asks the lighthouse again: a lighthouse restarted on its address forms the quorum, and the ranks
    get it. A lighthouse that stays gone still ends the quorum at ``quorum_timeout_s``: that is the ranks' own
    timeout on the call, whatever the server does."""
    return max(round(quorum_timeout_s / LIGHTHOUSE_RETRY_S), 1) - 1


def snapshot(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU (containers rebuilt, other values deep-copied)."""
    import copy

    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((k, snapshot(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return copy.deepcopy(state)


def _done(work, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


_TWIN = ("another live node already serves manifest worker {worker}: give this node the replica of a lost worker "
         "(python -m data.replicate --node-rank K) or stop it")


def _heartbeat_ages(address: str, worker: int) -> list[float]:
    """Seconds since the lighthouse last heard each replica of ``worker`` (its dashboard's /status lists every
    replica it has heard: ``w<worker>:<uuid>: seen <s>s ago``). A lighthouse that cannot be reached is
    :class:`LighthouseLost`, in one line naming the address and how to start one."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + LIGHTHOUSE_PROBE_S  # a lighthouse started with the nodes may need a moment
    while True:
        try:
            with urllib.request.urlopen(address.rstrip("/") + "/status", timeout=5) as r:
                page = r.read().decode("utf-8", "replace")
            break
        except urllib.error.HTTPError:
            return []  # it answers, without the dashboard: the quorum's own check (below) still refuses a twin
        except (OSError, ValueError) as e:
            if isinstance(e, ValueError) or time.monotonic() > deadline:
                raise LighthouseLost(f"no lighthouse answers at {address} ({_first_line(e)}): start one on the "
                                     "machine that address names (torchft_lighthouse --min_replicas 1 --bind "
                                     f"[::]:PORT, docs/elastic.md) or fix {LIGHTHOUSE_ENV}") from None
            time.sleep(0.5)
    found = re.findall(rf"\b{REPLICA_PREFIX}{worker}:[^\s:<]+: seen ([0-9.]+)(ms|s|µs|us|ns)? ago", page)
    scale = {"ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
    return [float(v) * scale.get(unit, 1.0) for v, unit in found]


def _worker_heartbeating(address: str, worker: int, settle_s: float = 1.5) -> bool:
    """Whether a live node already serves ``worker``: a replica of it the lighthouse keeps hearing from. A
    node that just died (restarted at once by its user) heard ``settle_s`` ago or more is not; one heard
    recently is looked at again after ``settle_s``: a live one has heartbeated since (torchft's managers
    beat every 100 ms), a dead one has not."""
    ages = _heartbeat_ages(address, worker)
    if not ages or min(ages) >= settle_s:
        return False
    time.sleep(settle_s)
    later = _heartbeat_ages(address, worker)
    return bool(later) and min(later) < settle_s


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def verbose(env: dict | None = None) -> bool:
    """Whether torchft's INFO lines are asked for: ``RISGD_VERBOSE`` set to anything but empty or 0."""
    return (os.environ if env is None else env).get(VERBOSE_ENV, "").strip() not in ("", "0")


def torchft_logging(env: dict | None = None) -> bool:
    """Quiet by default: torchft logs every quorum (a line with every member's address) and every commit at
    INFO, from its Rust side (``RUST_LOG``, read once, when torchft is first imported: call this before) and
    its Python loggers. Without ``RISGD_VERBOSE`` only their warnings and errors are shown (a ``RUST_LOG`` the
    user set is kept); with it, their INFO lines too. Returns whether verbose. The run's own line for a
    membership change is the trainer's, not torchft's."""
    env = os.environ if env is None else env
    loud = verbose(env)
    if not loud:
        env.setdefault("RUST_LOG", "error")
    for name in TORCHFT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if loud else logging.WARNING)
        if loud and not logger.handlers:  # Python's fallback handler shows warnings only: INFO needs one
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False  # not twice where the root logger has a handler of its own
    return loud
