"""Train an image model with SyncSGD, PR-SGD, RI-SGD or cooperative SGD under DeepSpeed.

    deepspeed --num_gpus 4 train.py --recipe recipes/digits.yaml algorithm=risgd mu=0.5 tau=50   # a checkout
    deepspeed --num_gpus 4 --module risgd_trainer.train --recipe digits algorithm=risgd mu=0.5    # installed
    risgd-train --recipe digits algorithm=sync mu=0 steps=100     # one process, no launcher

One process per rank (the ``deepspeed`` launcher starts them; on a CPU machine ``--num_gpus N``
starts N CPU ranks with gloo); started without a launcher it is a one-rank run. The recipe is a YAML
file or the name of a bundled one (digits, cifar10_resnet44, cifar100_resnet44, imagenet_resnet50;
``recipes/NAME.yaml`` finds it too), and its ``ds_config`` is found as given, next to the recipe or
among the bundled ones. The recipe names model, data, algorithm and schedule; ``key=value``
arguments override it (dotted keys for nested ones, e.g. ``data.partition=iid``). Results go to
``runs/RUN_NAME/`` (config.yaml, ds_config.json, manifest.yaml, metrics.jsonl, summary.json,
checkpoints/, wandb/). Re-running the same command resumes from the run's latest checkpoint (a
finished run is left as it is); a run directory is never continued under a configuration that
changes the experiment. Exit status: 0 done, 2 bad input (one line on stderr), 1 a failure.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import risgd_ext
from risgd_common.atomic import write_text_atomic
from risgd_common.cli import Parser
from risgd_common.hashing import sha256_tensors
from risgd_common.install import MissingExtra, command, need
from risgd_ext.live import LighthouseLost, LiveError, RunOver
from risgd_ext.round import NoFiniteContribution
from risgd_recipes.bundled import bundled_recipe, recipe_names
from risgd_trainer import elastic, run_lock, threads
from risgd_trainer.agree import USER_ERRORS, AgreedError, agree
from risgd_trainer.checkpoints import Checkpoints, Progress
from risgd_trainer.evaluation import evaluate
from risgd_trainer.lr_schedule import lr_factor
from risgd_trainer.run_config import RecipeError, Run, check_same_manifest, check_shards_source, resolve_run
from risgd_trainer.tracking import RunTracker, run_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True,
                        help="recipe YAML, or a bundled recipe's name: e.g. recipes/digits.yaml or digits")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (the LOCAL_RANK variable is used)")
    parser.add_argument("--plan", default=None,
                        help="YAML list of runs, each a list of key=value overrides applied after the command "
                             "line's: all are checked first, then trained one after another in this one process "
                             "group (a launch costs ~30 s of start-up); finished runs are skipped")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys (dotted for nested)")
    return parser.parse_args(argv)


def load_plan(path: str | None) -> list[list[str]]:
    """The plan's runs (``[[]]``: one run, the command line's)."""
    import yaml

    if path is None:
        return [[]]
    try:
        with open(path) as f:
            plan = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"plan {path} cannot be read ({' '.join(str(e).split())}): pass a YAML list of "
                          "override lists") from None
    if not isinstance(plan, list) or not plan or not all(
            isinstance(run, list) and all(isinstance(o, str) for o in run) for run in plan):
        raise RecipeError(f"plan {path} must be a non-empty YAML list of lists of key=value strings, "
                          "e.g. [[algorithm=sync, mu=0], [algorithm=risgd, mu=0.5]]")
    return plan


# -- set-up ----------------------------------------------------------------------------------------

def locate_recipe(path: str) -> str:
    """The recipe file ``path`` names: the file itself when it exists, else the bundled recipe of that
    name (``digits``, ``digits.yaml``, ``recipes/digits.yaml``: from anywhere, checkout or install)."""
    if os.path.isfile(path):
        return path
    found = bundled_recipe(path)
    if found is None:
        raise RecipeError(f"recipe {path} not found: pass a recipe YAML file or the name of a bundled one "
                          f"({', '.join(recipe_names()) or 'none is installed'})")
    return found


def check_extras(cfg: dict) -> None:
    """The optional packages (the 'train' extra) a run of ``cfg`` needs, checked before any work:
    MissingExtra (one line naming the install) for the first that is missing."""
    need("torchvision", "training (the image transforms of risgd_data)")
    if cfg["wandb"]["enabled"]:
        need("wandb", "logging to wandb (wandb.enabled=false turns it off)")
    if cfg["data"]["dataset"] == "digits" and not os.path.exists(os.path.join(cfg["data"]["shards"], "index.json")):
        need("sklearn", "making the digits shards")


def one_rank_environment() -> None:
    """Started without a launcher (``risgd-train ...``, ``python train.py ...``): the environment of a
    one-rank process group on this machine (DeepSpeed would otherwise look for MPI)."""
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
    if any(k in os.environ for k in launched):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def check_model(name: str) -> None:
    """The recipe's model name, checked by the model registry's own check (one line on failure)."""
    import risgd_models  # registers the CIFAR ResNets in timm

    try:
        risgd_models.check_model(name)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def make_shards_if_missing(cfg: dict) -> None:
    """Rank 0 writes the shards when the directory has none (the embedded digits, or from data.src)."""
    from risgd_data.errors import DataError
    from risgd_data.make_shards import make_shards

    data = cfg["data"]
    if not os.path.exists(os.path.join(data["shards"], "index.json")):
        source = "the embedded dataset" if data["src"] is None else f"data.src={data['src']}"
        print(f"making {data['dataset']} shards in {os.path.abspath(data['shards'])} from {source} (data.shards has "
              "no index.json; later runs reuse them)", file=sys.stderr, flush=True)
        try:
            make_shards(data["dataset"], data["shards"], src=data["src"], seed=0, progress=False)
        except MissingExtra as e:  # agreed by every rank like any bad input
            raise DataError(str(e)) from None
        except DataError as e:  # the source's own problem, named as the recipe keys that lead to it
            raise DataError(f"making shards in data.shards={data['shards']} from data.src={data['src']}: {e}") \
                from None


def load_data(run: Run, rank: int) -> tuple[dict, dict, int, str]:
    """The shard index, the manifest (the recipe's file, or built from its parameters, the same on
    every rank), the manifest worker this rank serves and the directory its shards are in; the shards
    this rank reads are verified here, before any engine work. An elastic run finds its worker in
    the node's replica record (identity by data, not by rank number)."""
    from risgd_data.index import load_index, verify_shards
    from risgd_data.manifest import build_manifest

    cfg, data = run.cfg, run.cfg["data"]
    shard_dir = elastic.replica_dir(cfg) if run.elastic else data["shards"]
    index = load_index(shard_dir)
    manifest = run.manifest or build_manifest(index, run.manifest_workers, cfg["mu"], partition=data["partition"],
                                              seed=cfg["seed"], hetero_std=data["hetero_std"],
                                              mode="coop" if cfg["algorithm"] == "coop" else "risgd")
    check_same_manifest(run.run_dir, manifest)
    full = data["verify"] == "full"  # else a replica's stamp spares re-hashing unchanged shards
    if run.elastic:  # a launch is one node: its ranks share its replica's (first) worker
        worker = elastic.worker_of_replica(manifest, shard_dir, 0)
    else:
        worker, _ = run.worker_of(rank)  # with node_size > 1 a node's ranks share its worker's chunks
    verify_shards(index, shard_dir, manifest["ranks"][worker]["shards"], full=full)
    # every rank evaluates a slice of the test set
    verify_shards(index, shard_dir, [s["name"] for s in index["splits"]["val"]["shards"]], split="val",
                  full=full)
    return index, manifest, worker, shard_dir


def build_optimizer(cfg: dict, model: torch.nn.Module, total_steps: int):
    opt = cfg["optimizer"]
    # No weight decay on BatchNorm and biases (the usual ResNet recipe).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": opt["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=opt["lr"], momentum=opt["momentum"], nesterov=opt["nesterov"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg["schedule"], opt["lr"], total_steps))
    return optimizer, scheduler


# -- evaluation ------------------------------------------------------------------------------------

def on_loopback() -> bool:
    """Whether every rank of this run is on this machine: its ``MASTER_ADDR`` (where the ranks meet; in an
    elastic run, where the other nodes reach this node) is a loopback address. A bandwidth measured there
    is a loopback's (or the machine's own links), not a network's."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        found = {info[4][0] for info in socket.getaddrinfo(addr, None)}
        return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)
    except (OSError, ValueError):
        return False


def cost_advice(cfg: dict, stats: dict, world_size: int | None = None) -> dict:
    """The cost model's prediction for this run's measured compute and bytes on the recipe's network, for
    ``world_size`` ranks (default the engine's: an elastic node's engine counts its own ranks alone)."""
    from risgd_planner.model import advise

    net = cfg["network"]
    stats = stats if world_size is None else {**stats, "world_size": world_size}
    return advise(stats, net["bandwidth_gbit"], net["latency_us"] / 1e6, net["target_comm_share"], cfg["tau"],
                  loopback=on_loopback())


# -- what a run says ------------------------------------------------------------------------------

BATCH_TOLERANCE = 1.25  # a global batch this factor off the recipe's data.global_batch is warned about


def batch_lines(run: Run, manifest: dict, per_rank: list[int]) -> list[str]:
    """The line saying the per-rank and global batch the batch policy gives, and a warning when the
    global batch is more than :data:`BATCH_TOLERANCE` off the recipe's stated ``data.global_batch``."""
    data = run.cfg["data"]
    total, lo, hi = sum(per_rank), min(per_rank), max(per_rank)
    over = f"{run.world_size} rank(s)"
    if run.elastic:  # this launch is one node: the run's global batch is every worker's (the manifest's)
        k = run.node_size * data["base_batch"]
        total = sum(k if data["batch_policy"] == "split" else
                    sum(k if c["fraction"] >= 1.0 else max(1, round(c["fraction"] * k)) for c in r["chunks"])
                    for r in manifest["ranks"])
        over = f"{run.manifest_workers} nodes of {run.world_size} rank(s)"
    chunks = [len(r["chunks"]) for r in manifest["ranks"]]
    held = f"{min(chunks)}" if min(chunks) == max(chunks) else f"{min(chunks)}-{max(chunks)}"
    rank_words = f"{lo}" if lo == hi else f"{lo}-{hi}"
    if data["batch_policy"] == "per_chunk":
        how = f"per_chunk: data.base_batch {data['base_batch']} from each of the {held} chunk(s) a worker holds"
    else:
        how = f"split: data.base_batch {data['base_batch']} per worker, shared among its chunks"
    lines = [f"batch: {rank_words} images per rank per step ({how}), global {total} over {over}"]
    stated = data["global_batch"]
    if stated and not 1 / BATCH_TOLERANCE <= total / stated <= BATCH_TOLERANCE:
        fix = ("data.batch_policy=split keeps a worker's batch at data.base_batch whatever mu"
               if data["batch_policy"] == "per_chunk" else "data.base_batch sets it")
        lines.append(f"warning: the global batch {total} is {total / stated:.2g}x the recipe's data.global_batch "
                     f"{stated} (the lr and schedule were set for that): {fix}; or scale optimizer.lr, or set "
                     f"data.global_batch={total} if this batch is meant")
    return lines


def finished_lines(run: Run, summary: dict) -> str:
    """Rank 0's last words on a finished run: where it went, how it did, how to compare it, and the
    cost model's advice in one sentence (all of it in ``summary.json``)."""
    acc = summary.get("final_test_acc")
    acc_words = ("no evaluation" if acc is None
                 else f"final test accuracy {acc:.2f}% (best {summary['best_test_acc']:.2f}%)")
    lines = [f"done: {run.run_dir}: {summary['steps']} steps, {summary['comm_rounds']} communication rounds in "
             f"{summary['wall_seconds']:.0f} s; {acc_words}",
             f"  compare it with others: {command('tools.compare')} {run.run_dir} OTHER_RUN ...  (or the folder "
             f"{os.path.dirname(run.run_dir) or '.'})"]
    if summary.get("deadline_margin"):
        by = {w: n for w, n in (summary.get("late_by_worker") or {}).items() if n}
        lines.append(f"  round deadline (deadline_margin={summary['deadline_margin']:g}): {summary['late_rounds']} "
                     "rounds closed without late workers" + (f" (rounds left out, by worker: {by})" if by else "")
                     + (f", {summary['late_waited']} waited for them (the others did not cover their data)"
                        if summary["late_waited"] else ""))
    advice = summary.get("cost_model") or {}
    if advice.get("measured_on_loopback") and advice.get("bandwidth_gbit"):  # no network measured: no advice
        nodes, k = advice.get("nodes", advice["ranks"]), advice.get("node_size", 1)
        ask = (f"{command('risgd_planner')} --nodes {nodes}" + (f" --ranks-per-node {k}" if k > 1 else "")
               + f" --model-bytes {round(advice['bytes_per_allreduce'])} --compute-ms "
               f"{1e3 * advice['compute_s_per_step']:.3g} --bandwidth-gbit B")
        lines.append(f"  cost model (summary.json key cost_model): at {advice['bandwidth_gbit']:.3g} Gbit/s "
                     "measured on loopback (every rank on this machine), not a network: no advice on tau; for a "
                     f"network of B Gbit/s set network.bandwidth_gbit=B, or ask {ask}")
    elif "recommended_tau" in advice and advice.get("bandwidth_gbit"):
        lines.append(f"  cost model (summary.json key cost_model): at {advice['bandwidth_gbit']:.3g} Gbit/s "
                     f"({advice['bandwidth_source']}), communication is {advice['risgd_comm_share']:.0%} of a step at "
                     f"tau={advice['tau']}; tau >= {advice['recommended_tau']} keeps it under "
                     f"{run.cfg['network']['target_comm_share']:.0%}")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------

_INTERRUPTED: list[int] = []  # the signal that stopped this process (Ctrl-C, the launcher's SIGTERM)


def _on_interrupt(signum, frame) -> None:
    """The first Ctrl-C (or SIGTERM) stops the run; one arriving while it stops (Ctrl-C reaches every
    process of the group, and DeepSpeed's launcher forwards its own) is noted, not raised again: a
    second KeyboardInterrupt inside the handling would print a traceback instead of the one line."""
    _INTERRUPTED.append(signum)
    if len(_INTERRUPTED) == 1:
        raise KeyboardInterrupt


def latest_checkpoint(run: Run) -> tuple[str, str | None]:
    """(the path of the run's ``checkpoints/latest``, the tag it names or None: no checkpoint yet)."""
    latest = os.path.join(run.run_dir, "checkpoints", "latest")
    return latest, (open(latest).read().strip() if os.path.exists(latest) else None)


def interrupted_line(runs: list[Run]) -> str:
    """Rank 0's one line when a run is interrupted: where the same command resumes it."""
    for run in runs:
        if os.path.exists(os.path.join(run.run_dir, "summary.json")):
            continue
        latest, tag = latest_checkpoint(run)
        where = f"its checkpoint {tag} ({latest})" if tag else "the start (no checkpoint yet)"
        return f"interrupted: {run.run_dir} stops here; the same command resumes it from {where}"
    return "interrupted"


def refuse(error: Exception | str, speak: bool) -> int:
    """Exit status 2 after one ``error:`` line on stderr (from ``speak``ing ranks)."""
    if speak:
        print(f"error: {error}", file=sys.stderr)
    return 2


def die_with_launcher() -> None:
    """Under risgd-elastic (``RISGD_LAUNCHER_PID``, its pid): this rank is killed when the launcher dies, by any
    signal (torchrun starts ranks in sessions of their own, so a kill of the launcher's process group does not
    reach them). Linux's PR_SET_PDEATHSIG; elsewhere nothing changes."""
    launcher = os.environ.get("RISGD_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the request: go now
        os._exit(128 + signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    first = os.environ.get("RANK", "0") == "0"  # before the process group: every rank finds the same error
    runs: list[Run] = []
    # Ctrl-C reaches every rank: rank 0 says in one line where the run resumes, the others stay quiet
    # (a rank blocked in a collective sees its peers leave as a gloo error: the signal explains it).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_interrupt)
    try:
        # every run checked before any work
        recipe = locate_recipe(args.recipe)
        runs = [resolve_run(recipe, [*args.overrides, *extra], world_size) for extra in load_plan(args.plan)]
        dirs = [run.run_dir for run in runs]
        if len(set(dirs)) < len(dirs):
            raise RecipeError(f"the plan names run directory {next(d for d in dirs if dirs.count(d) > 1)} twice: "
                              "give each run its own run_name=")
        for run in runs:
            check_model(run.cfg["model"]["name"])
            check_extras(run.cfg)
            if not run.elastic and not run.finished:  # an elastic run trains on its nodes' replicas
                check_shards_source(run.cfg["data"], run.origins)
            if first and not run.finished:
                for note in run.notes:
                    print(note, file=sys.stderr)
            if run.finished and first:
                print(f"{run.run_dir} is finished (summary.json): nothing to do; pick a new run_name= to train "
                      "again", file=sys.stderr)
        pending = [run for run in runs if not run.finished]
        if pending:
            # A rank that dies makes the others fail their next collective after this timeout instead of
            # hanging (the deepspeed launcher also kills the node's other ranks when one exits).
            timeout = max(run.cfg["dist_timeout_s"] for run in pending)
            one_rank_environment()
            risgd_ext.init_distributed(timeout=datetime.timedelta(seconds=timeout))
        for run in pending:
            Trainer(run).fit()
        return 0
    except AgreedError as e:  # found on some rank after start, agreed by all: rank 0 says it
        return refuse(e, dist.get_rank() == 0)
    except RunOver as e:  # an elastic node back after the other nodes finished the run: nothing to do
        if dist.get_rank() == 0:
            print(e, file=sys.stderr, flush=True)
        return 0
    except LiveError as e:  # an elastic run below its floor, its lighthouse lost, a node serving a served worker:
        return refuse(elastic.stop_line(e), dist.get_rank() == 0)  # the latest checkpoint is kept; the same
        # commands resume
    except NoFiniteContribution as e:  # every worker diverged at once: the work itself failed (exit 1)
        if dist.get_rank() == 0:
            print(f"error: {e}: the run stops here; its last checkpoint is kept (resuming it repeats the same "
                  "steps: change the learning rate or the schedule, as a new run_name=)", file=sys.stderr)
        return 1
    except (*USER_ERRORS, MissingExtra) as e:  # one line naming the problem and the fix
        return refuse(e, first or dist.is_initialized())
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and not _INTERRUPTED:  # another handler turned the signal into it
            _INTERRUPTED.append(signal.SIGINT)
        if not _INTERRUPTED:
            raise
        if first:
            print(interrupted_line(runs), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # no teardown: the peers are gone, and destroying the group would wait for them or fail loudly
        os._exit(128 + _INTERRUPTED[0])
    finally:
        if dist.is_initialized() and not _INTERRUPTED:
            dist.destroy_process_group()


class Trainer:
    """One run, in the process group that main() started: ``Trainer(run).fit()``. It holds the run's parts as
    fields (the engine, the loaders, the run record's tracker, the checkpoints, who trains: ``nodes``, a fixed
    run's ranks or an elastic run's live nodes) and where the run stands (``step``, ``best``, ``last_eval``);
    :meth:`fit` reads top to bottom: set-up, joining, then per step a batch, the step, the round's
    aftermath, an evaluation and a checkpoint when due, and the summary."""

    run: Run
    engine: Any  # risgd_ext's DeepSpeed engine; engine.risgd holds the rounds
    scheduler: Any  # the learning-rate schedule (torch LambdaLR)
    nodes: elastic.FixedNodes  # who trains: the run's ranks, or an elastic run's live nodes
    checkpoints: Checkpoints
    loader: Any  # this rank's train loader (risgd_data.loader.RankLoader)
    eval_loader: Any  # this rank's slice of the test set
    tracker: RunTracker  # the run record (metrics.jsonl, summary.json, wandb)

    def __init__(self, run: Run) -> None:
        from deepspeed.accelerator import get_accelerator

        self.run, self.cfg = run, run.cfg
        self.rank = dist.get_rank()
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
        # where the run stands: the steps done, the best test accuracy, the last evaluation's and checkpoint's steps,
        # the wall seconds trained before this process and the clock they go on from (None until the loop starts)
        self.step, self.best, self.last_eval, self.last_ckpt = 0, 0.0, 0, 0
        self.wall = 0.0
        self.t0: float | None = None
        self.cursor: dict | None = None  # this worker's data position, from its own checkpoint
        self.last: dict = {"train_loss": float("nan")}  # the last metrics logged
        self.said_behind = False  # an elastic node behind the others said once that it writes nothing

    # -- the run, top to bottom ------------------------------------------------------------------------

    def fit(self) -> None:
        """The run: its loop, evaluations, checkpoints and the summary, with the run directory held."""
        threads.register()  # the ranks on one machine share its cores, whoever launched them (oversubscription is slow)
        threads.balance(shared=self.run.elastic)
        if not self.run.elastic:  # one run at a time in a run directory (an elastic run's nodes share theirs)
            agree(self._hold_run_dir)
        try:
            self.set_up()
            self.join()
            self.open()
            self.loop()
            self.finish()
        except RunOver:  # the other nodes finished the run: its one line below the bar, as a terminal shows it
            if hasattr(self, "bar"):
                self.bar.close()
            raise
        finally:
            run_lock.release(self.run.run_dir)

    def loop(self) -> None:
        """From where the run stands to its last step: a batch, a step, a round's aftermath, and an evaluation
        and a checkpoint when due."""
        while self.step < self.total_steps:
            if self.engine.risgd.skipping:  # late at its round's deadline, the others cover its data: the round
                self.skip_step()            # takes its average without it
            else:
                self.train_step(*self.batch())
            self.aftermath()
            if self.evaluation_due():
                self.evaluate()
            if self.checkpoint_due():
                self.checkpoint()
        self.bar.close()

    # -- set-up ----------------------------------------------------------------------------------------

    def _hold_run_dir(self) -> None:
        if self.rank == 0:
            run_lock.hold(self.run.run_dir)

    def _make_shards(self) -> None:
        if self.rank == 0:
            make_shards_if_missing(self.cfg)

    def set_up(self) -> None:
        """The data (shards made if missing, verified), who trains, and the engine, built the same on every rank."""
        from risgd_data.manifest import steps_per_epoch

        if not self.run.elastic:  # an elastic run trains on the nodes' replicas: nothing is made on the fly
            agree(self._make_shards)
        self.index, self.manifest, self.worker, self.shard_dir = agree(functools.partial(load_data, self.run,
                                                                                         self.rank))
        self.nodes = elastic.nodes_for(self.run, self.manifest, self.index, self.worker)
        self.share = (self.run.worker_of(self.rank)[1], self.run.node_size)  # this rank's part of its worker's batch
        self.epoch_steps = steps_per_epoch(self.manifest, self.run.worker_batch())
        self.total_steps = self.run.total_steps(self.epoch_steps)
        self.engine, self.scheduler = agree(self._build_engine)
        if self.engine.risgd.deadline is not None:  # late workers are left out only when the others cover the data
            self.engine.risgd.deadline.accept = self.nodes.accept
        self.checkpoints = Checkpoints(self.run.run_dir, self.engine)
        torch.manual_seed(self.cfg["seed"] * 100003 + self.nodes.rng_id(self.rank) * 7919)  # per-rank (dropout)

    def _build_engine(self) -> tuple[Any, Any]:
        import risgd_models

        cfg = self.cfg
        torch.manual_seed(cfg["seed"])  # identical initial model on every rank
        model = risgd_models.create_model(cfg["model"]["name"], num_classes=self.index["num_classes"],
                                          in_chans=self.index["image_shape"][0] if self.index.get("image_shape") else 3,
                                          drop_rate=cfg["model"]["drop_rate"])
        if cfg["model"]["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(cfg, model, self.total_steps)
        engine, _, _, scheduler = risgd_ext.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=self.run.ds_config, risgd=self.run.risgd)
        engine.risgd.identity = self.nodes.identity  # an elastic run's state is keyed by its manifest worker
        return engine, scheduler

    def join(self) -> None:
        """Take part: a fixed run resumes from its latest checkpoint at once; an elastic one meets the live nodes
        first and resumes only when they are not going on without it (a node behind them is healed from a live
        peer, and goes on from the progress it took: no checkpoint file is read)."""
        healed = self.nodes.join(self.engine, self.resume, self.standing)
        if healed is not None:
            self.take(healed)

    def resume(self) -> None:
        """From the run's latest checkpoint, if any (its RNG too): every rank, then agreed."""
        self.take(self.checkpoints.load(self.worker))
        if self.step and self.rank == 0:
            print(f"{self.run.name}: resuming from step {self.step} of {self.total_steps} ({self.checkpoints.dir})",
                  file=sys.stderr, flush=True)

    def take(self, at: Progress) -> None:
        """Go on from ``at``: a checkpoint's progress, or a live peer's at a heal (with its schedule)."""
        self.step = self.last_ckpt = at.step
        self.best, self.last_eval, self.wall, self.cursor = at.best, at.last_eval, at.wall, at.cursor
        if self.t0 is not None:
            self.t0 = time.perf_counter() - at.wall
        if at.scheduler is not None:
            self.scheduler.load_state_dict(at.scheduler)

    def standing(self) -> Progress:
        """Where the run stands now (what a node healed from this one takes, asked from torchft's quorum thread)."""
        wall = self.wall if self.t0 is None else time.perf_counter() - self.t0
        return Progress(step=self.step, best=self.best, last_eval=self.last_eval, wall=wall,
                        scheduler=self.scheduler.state_dict())

    def train_loader(self, first: int, cursor: dict | None = None):
        """This rank's train loader from step ``first``. Elastic: each chunk drawn at its share of a step by
        whichever nodes hold it now (held and drawn), each chunk's stream going on from its cursor (where the
        loader before stood: none drawn twice, none skipped)."""
        from risgd_data.loader import make_train_loader

        data = self.cfg["data"]
        return make_train_loader(self.manifest, self.shard_dir, self.worker, data["base_batch"],
                                 policy=data["batch_policy"], transform=self.transform, seed=self.cfg["seed"],
                                 start_step=first, num_workers=data["num_workers"],
                                 pin_memory=self.device.type == "cuda", share=self.share, decode=data["decode"],
                                 device=self.device,  # gpu: batches come decoded on the device
                                 chunk_scale=self.nodes.draw_scales(self.engine.risgd), cursor=cursor)

    def open(self) -> None:
        """The loaders, the run record, the run's files and the clock, from the step the run stands at."""
        from risgd_data.loader import make_eval_loader
        from risgd_data.transforms import eval_transform, train_transform

        run, cfg, data, rank = self.run, self.cfg, self.cfg["data"], self.rank
        start = self.step
        # pinned host memory on CUDA, so the copies of a batch overlap compute
        self.transform = train_transform(self.index["dataset"], data["image_size"], fast=data["fast_decode"])
        self.loader = self.train_loader(start, self.cursor)
        if start == 0:  # said once, at the start of a run (a resumed run said it then)
            batches_of: list = [None] * run.world_size  # what each rank draws per step under the batch policy
            dist.all_gather_object(batches_of, self.loader.batch_size)
            if rank == 0:
                for line in batch_lines(run, self.manifest, batches_of):
                    print(line, file=sys.stderr, flush=True)
        self.eval_loader = make_eval_loader(self.shard_dir, data["eval_batch"], rank=rank, world_size=run.world_size,
                                            transform=eval_transform(self.index["dataset"], data["image_size"]))
        self.fmt = torch.channels_last if cfg["model"]["channels_last"] else torch.contiguous_format
        # an elastic run's record is written by the node of the lowest live worker (it moves when that node is lost)
        self.tracker = RunTracker(run.run_dir, cfg, active=rank == 0 and self.nodes.recording, resume_step=start)
        if rank == 0:
            write_text_atomic(os.path.join(run.run_dir, "ds_config.json"), json.dumps(run.ds_config, indent=2))
            if not os.path.exists(os.path.join(run.run_dir, "manifest.yaml")):
                from risgd_data.manifest import write_manifest
                write_manifest(self.manifest, os.path.join(run.run_dir, "manifest.yaml"))

        self.t0 = time.perf_counter() - self.wall
        # loss sum, steps, samples skipped since the last log; on the device, so NCCL can reduce it and
        # adding the loss does not wait for the GPU every step
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.last = self.tracker.last_logged() or self.last
        self.skipped_seen = self.loader.samples_skipped
        self.bar = tqdm(total=self.total_steps, initial=start, disable=rank != 0, desc=run.name, dynamic_ncols=True)
        self.batches = iter(self.loader)

    # -- a step ----------------------------------------------------------------------------------------

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's images and labels, on the device."""
        images, labels = next(self.batches)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
        return images, labels.to(self.device, non_blocking=True)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on a batch: forward, backward and the engine's step (its round, when one is due)."""
        self.step += 1
        loss = F.cross_entropy(self.engine(images), labels)
        self.engine.backward(loss)
        try:
            self.engine.step()
        except LighthouseLost:  # an elastic run's single point: checkpoint here; the same commands resume (the
            over = self.nodes.over(self.step)  # round due at this step is done first then), unless the others
            # finished the run meanwhile
            if over is not None:
                raise RunOver(over) from None
            self.save()
            raise
        self.running[0] += loss.detach()
        self.running[1] += 1
        self.bar.update(1)

    def skip_step(self) -> None:
        """A step this worker skips: it was late at its round's deadline and the workers on time cover its data
        (risgd_ext.deadline). Its batch is not drawn: the loader goes on at the step after the round, as it would
        have (each chunk's stream is a function of the step), without decoding the batches between (on a slow
        node, loading them would cost about what the steps did). The learning-rate schedule and the round move on."""
        self.step += 1
        self.engine.skip_step()
        self.bar.update(1)
        if not self.engine.risgd.skipping:  # the round closed: the next batch is the next step's
            skipped = self.loader.samples_skipped
            self.loader = self.train_loader(self.step)
            self.loader.samples_skipped = skipped
            self.batches = iter(self.loader)

    def aftermath(self) -> None:
        """The round's aftermath, from who trains: the run record's writer, and in an elastic run a heal (go on
        from the others' step, with their schedule and the data from there) or a change of the live nodes (each
        chunk's stream goes on from here, drawn at its share by the nodes live now)."""
        for event in self.engine.risgd.take_late_events():  # rounds closed without late workers, or waited for them
            self.tracker.log(event)
        after = self.nodes.after_step(self.engine.risgd, self.step, self.tracker, self.rank)
        self.tracker = after.tracker
        if after.restart is None:
            return
        cursor = None  # healed: this node's own streams at the others' step
        if after.healed is not None:
            self.take(after.healed)
            self.running.zero_()
            self.bar.reset(total=self.total_steps)
            self.bar.update(self.step)
        else:
            cursor = self.loader.cursor(self.step)
        self.loader = self.train_loader(self.step, cursor)
        self.batches, self.skipped_seen = iter(self.loader), self.loader.samples_skipped

    # -- an evaluation, a checkpoint -------------------------------------------------------------------

    def evaluation_due(self) -> bool:
        """Log and evaluate only where every rank holds the averaged model: the first average at or after each
        eval_every multiple, and the last step (which the config made an average)."""
        every = self.cfg["eval_every"]
        due = every and self.step >= (self.last_eval // every + 1) * every
        return self.step == self.total_steps or bool(due and self.engine.risgd.is_average())

    def evaluate(self) -> None:
        """The metrics since the last log and the test accuracy, on the averaged model, logged to the record."""
        self.running[2] = self.loader.samples_skipped - self.skipped_seen
        self.skipped_seen = self.loader.samples_skipped
        if self.run.elastic:
            threads.balance()  # a node started on this machine since: the cores shared again
        with self.engine.risgd.averaged() as stats:  # every rank holds the averaged model inside
            dist.all_reduce(self.running)  # telemetry: one tiny collective per log interval
            metrics = {"step": self.step, "epoch": self.step / self.epoch_steps, "lr": self.scheduler.get_last_lr()[0],
                       "train_loss": float(self.running[0] / self.running[1]), **run_metrics(stats),
                       "wall_seconds": time.perf_counter() - self.t0, "samples_skipped": int(self.running[2])}
            t_eval = time.perf_counter()
            metrics.update(evaluate(self.engine.module, self.eval_loader, self.device, self.index["num_classes"],
                                    self.cfg["model"]["channels_last"]))
            metrics["eval_seconds"] = time.perf_counter() - t_eval
        self.running.zero_()
        self.best = max(self.best, metrics["test_acc"])
        if self.rank == 0:
            metrics["data_coverage"] = self.nodes.coverage(self.engine.risgd)  # of the training set: the live workers'
            self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", acc=f"{metrics['test_acc']:.1f}")
        if self.may_write():
            self.tracker.log(metrics)
        self.last, self.last_eval = metrics, self.step

    def checkpoint_due(self) -> bool:
        return (self.nodes.checkpoint_due(self.engine.risgd, self.step, self.last_ckpt, self.cfg["checkpoint_every"])
                or self.step == self.total_steps)

    def checkpoint(self) -> None:
        self.last_ckpt = self.step
        self.save()

    def may_write(self) -> bool:
        """Whether this node may write the run's files at this step (checkpoints, ``latest``, the record): always in
        a fixed run; an elastic node behind the others (back from a freeze or a partition: the run finished, or its
        latest checkpoint is past this step) writes nothing, and says so once. Its ranks agree (rank 0 reads)."""
        if not self.run.elastic:
            return True
        why: list = [self.nodes.behind(self.step) if self.rank == 0 else None]
        if self.run.world_size > 1:
            dist.broadcast_object_list(why, src=0)
        if why[0] is not None and self.rank == 0 and not self.said_behind:
            self.said_behind = True
            print(f"live: this node is behind the run ({why[0]}): it writes nothing", file=sys.stderr, flush=True)
        return why[0] is None

    def save(self) -> None:
        """A checkpoint at this step (of an elastic run: each node writes its own state, the recording one the rest;
        a node behind the others none)."""
        if not self.may_write():
            return
        at = Progress(step=self.step, best=self.best, last_eval=self.last_eval, wall=time.perf_counter() - self.t0,
                      cursor=self.loader.cursor(self.step))
        self.checkpoints.save(at, rank_state_only=not self.nodes.recording)

    # -- the summary -----------------------------------------------------------------------------------

    def finish(self) -> None:
        """The final average for good on every rank (with overlap: the last round, applied now), every rank's
        model digest, summary.json and rank 0's last words."""
        stats = self.engine.risgd.consensus()
        digest = sha256_tensors(self.engine.module.state_dict().items())
        digests: list = [None] * self.run.world_size
        dist.all_gather_object(digests, digest)  # every rank's final model: equal after the last average
        summary = self.summary(stats, digest, digests)
        self.tracker.finish(summary)  # before this node leaves: a node coming back finds the run finished
        self.nodes.finish(self.engine.risgd, digest, self.rank)
        if self.rank == 0:
            print(finished_lines(self.run, summary), flush=True)
        dist.barrier()

    def summary(self, stats: dict, digest: str, digests: list[str]) -> dict:
        """summary.json: the run's configuration, its communication and accuracy, the models' digests, who
        trained (an elastic run's record) and the cost model's advice for the run's ranks (every node's)."""
        run, cfg, data = self.run, self.cfg, self.cfg["data"]
        summary = {"algorithm": cfg["algorithm"], "tau": 1 if run.risgd is None else run.risgd.tau,
                   "mu": cfg["mu"], "world_size": run.world_size, "steps": self.total_steps, **run_metrics(stats),
                   "wall_seconds": time.perf_counter() - self.t0, "final_test_acc": self.last.get("test_acc"),
                   "best_test_acc": self.best, "final_train_loss": self.last["train_loss"], "seed": cfg["seed"],
                   "partition": data["partition"], "batch_policy": data["batch_policy"], "node_size": run.node_size,
                   "workers": run.workers, "tau_intra": cfg["tau_intra"], "overlap": cfg["overlap"],
                   "samples_skipped": self.loader.samples_skipped, "recipe": cfg["recipe"], "run_name": run.name,
                   "model_sha256": digest, "min_data_coverage": self.tracker.min_logged("data_coverage"),
                   "rank_model_sha256": digests}
        if run.risgd is not None and run.risgd.deadline_margin:  # who was late, from the record's rounds
            late = [e for e in self.tracker.history() if e.get("event") == "late"]
            summary.update(deadline_margin=run.risgd.deadline_margin, late_rounds=stats["late_rounds"],
                           late_waited=stats["late_waited"], deadline_s=stats["deadline_s"],
                           late_by_worker={str(w): sum(w in e["left_out_workers"] for e in late)
                                           for w in range(run.workers)})
        summary.update(self.nodes.summary(self.engine.risgd, self.tracker, summary["wall_seconds"]))
        summary["cost_model"] = cost_advice(cfg, stats, summary["world_size"])  # the run's ranks: every node's
        return summary


if __name__ == "__main__":
    sys.exit(main())
