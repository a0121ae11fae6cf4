"""Train an image model with SyncSGD, PR-SGD, RI-SGD or cooperative SGD under DeepSpeed.

    deepspeed --num_gpus 4 train.py --recipe recipes/digits.yaml algorithm=risgd mu=0.5 tau=50

One process per rank (the ``deepspeed`` launcher starts them; on a CPU machine ``--num_gpus N``
starts N CPU ranks with gloo). The recipe names model, data, algorithm and schedule; ``key=value``
arguments override it (dotted keys for nested ones, e.g. ``data.partition=iid``). Results go to
``runs/RUN_NAME/`` (config.yaml, ds_config.json, metrics.jsonl, summary.json, checkpoints/, wandb/).
Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from risgd_recipes.config import RecipeError, load_recipe, run_name
from risgd_recipes.schedule import lr_factor
from risgd_recipes.tracking import RunTracker
from tqdm import tqdm

from risgd_common.atomic import write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/digits.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (the LOCAL_RANK variable is used)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys (dotted for nested)")
    return parser.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------

def prepare_shards(cfg: dict, rank: int) -> dict:
    """The shard index; rank 0 writes the shards first if the directory has none."""
    from risgd_data.index import load_index
    from risgd_data.make_shards import make_shards

    shards = cfg["data"]["shards"]
    if rank == 0 and not os.path.exists(os.path.join(shards, "index.json")):
        make_shards(cfg["data"]["dataset"], shards, src=cfg["data"]["src"], seed=0, progress=False)
    dist.barrier()
    return load_index(shards)


def prepare_manifest(cfg: dict, index: dict, world_size: int) -> dict:
    """The redundancy manifest: the recipe's file, or built from its parameters (same on every rank)."""
    from risgd_data.manifest import build_manifest, load_manifest

    data = cfg["data"]
    if data["manifest"]:
        manifest = load_manifest(data["manifest"])
    else:
        mode = "coop" if cfg["algorithm"] == "coop" else "risgd"
        manifest = build_manifest(index, world_size, cfg["mu"], partition=data["partition"], seed=cfg["seed"],
                                  hetero_std=data["hetero_std"], mode=mode)
    check_world_size(manifest, world_size)
    return manifest


def check_world_size(manifest: dict, world_size: int) -> None:
    if manifest["workers"] != world_size:
        raise RecipeError(f"the manifest is for {manifest['workers']} workers but this run has {world_size} "
                          "ranks: launch with that many ranks or rebuild the manifest with --workers")


# -- DeepSpeed -------------------------------------------------------------------------------------

def build_ds_config(cfg: dict, world_size: int) -> dict:
    """The recipe's ds_config file plus the batch sizes and, except for SyncSGD, the risgd block."""
    path = cfg["ds_config"]
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise RecipeError(f"ds_config {path} not found: set ds_config= to a file under ds_configs/") from None
    gas = ds.get("gradient_accumulation_steps", 1)
    # DeepSpeed's batch bookkeeping; the real per-rank batch is the loader's (it grows with q).
    ds["train_micro_batch_size_per_gpu"] = cfg["data"]["base_batch"]
    ds["train_batch_size"] = cfg["data"]["base_batch"] * gas * world_size
    block = ds.pop("risgd", {})
    if cfg["algorithm"] != "sync":
        block.update(tau=cfg["tau"], warmup_sync_steps=cfg["warmup_sync_steps"],
                     average_optimizer_state=cfg["average_optimizer_state"], failures=cfg["failures"])
        ds["risgd"] = block
    return ds


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

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_classes: int) -> dict:
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        top = model(images).topk(min(5, num_classes), dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += labels.numel()
    model.train()
    out = {"test_acc": 100.0 * correct1 / max(1, total)}
    if num_classes > 10:  # top-5 says little with 10 classes
        out["test_acc5"] = 100.0 * correct5 / max(1, total)
    return out


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's state (parameters and buffers): equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(digest: str, world_size: int) -> list[str]:
    """Every rank's model digest (rank order): after a final average they must all be equal."""
    digests: list = [None] * world_size
    dist.all_gather_object(digests, digest)
    return digests


def cost_advice(cfg: dict, stats: dict) -> dict:
    """The cost model's prediction for this run's measured compute and bytes on the recipe's network."""
    from risgd_ext.cost_model import advise

    net = cfg["network"]
    tau = None if cfg["algorithm"] == "sync" else cfg["tau"]
    return advise(stats, net["bandwidth_gbit"], net["latency_us"] / 1e6, net["target_comm_share"], tau)


# -- the run ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from risgd_data.errors import DataError

    from risgd_ext.config import ConfigError

    args = parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        return train(cfg)
    except (RecipeError, ConfigError, DataError) as e:  # one line naming the problem and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(cfg: dict) -> int:
    import deepspeed
    import risgd_models as models
    import timm
    from deepspeed.accelerator import get_accelerator
    from risgd_data.loader import make_eval_loader, make_train_loader
    from risgd_data.manifest import live_coverage
    from risgd_data.transforms import eval_transform, train_transform

    import risgd_ext

    if not timm.is_model(cfg["model"]["name"]):  # before any process group or data work
        raise RecipeError(f"unknown model '{cfg['model']['name']}': use resnet8_digits, resnet20_cifar, "
                          "resnet44_cifar, resnet56_cifar or a timm model name (timm.list_models())")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one node share its cores; oversubscription is slow
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    if cfg["data"]["manifest"]:  # refuse a mismatched manifest before starting any process group
        from risgd_data.manifest import load_manifest
        check_world_size(load_manifest(cfg["data"]["manifest"]), world_size)
    # A rank that dies makes the others fail their next collective after this timeout instead of
    # hanging (the deepspeed launcher also kills the node's other ranks when one exits).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(seconds=cfg["dist_timeout_s"]))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    index = prepare_shards(cfg, rank)
    manifest = prepare_manifest(cfg, index, world_size)
    data = cfg["data"]
    run_dir = os.path.join(cfg["runs_dir"], run_name(cfg))
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    steps_per_epoch = max(1, manifest["epoch_samples"] // data["base_batch"])
    tau = 1 if cfg["algorithm"] == "sync" else cfg["tau"]
    total_steps = cfg["steps"] or -(-cfg["epochs"] * steps_per_epoch // tau) * tau  # whole rounds
    if total_steps % tau:
        raise RecipeError(f"steps={total_steps} must be a multiple of tau={tau} so the run ends on an average")

    torch.manual_seed(cfg["seed"])  # identical initial model on every rank
    model = models.create_model(cfg["model"]["name"], num_classes=index["num_classes"],
                                in_chans=index["image_shape"][0] if index.get("image_shape") else 3,
                                drop_rate=cfg["model"]["drop_rate"])
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    ds_config = build_ds_config(cfg, world_size)
    engine, _, _, scheduler = risgd_ext.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)

    start, wall_before, best = 0, 0.0, 0.0
    if os.path.exists(os.path.join(ckpt_dir, "latest")):
        _, client = engine.load_checkpoint(ckpt_dir)
        start, wall_before, best = client["step"], client["wall_seconds"], client["best_test_acc"]
    if start == 0:  # per-rank randomness (dropout); a resumed run gets its RNG back from the checkpoint
        torch.manual_seed(cfg["seed"] * 100003 + rank * 7919)

    loader = make_train_loader(manifest, data["shards"], rank, data["base_batch"], policy=data["batch_policy"],
                               transform=train_transform(index["dataset"], data["image_size"]), seed=cfg["seed"],
                               start_step=start, num_workers=data["num_workers"])
    eval_loader = None
    if rank == 0:  # rank 0 evaluates the averaged model
        eval_loader = make_eval_loader(data["shards"], data["eval_batch"],
                                       transform=eval_transform(index["dataset"], data["image_size"]))

    tracker = RunTracker(run_dir, cfg, active=rank == 0, resume_step=start)
    if rank == 0:
        write_text_atomic(os.path.join(run_dir, "ds_config.json"), json.dumps(ds_config, indent=2))
        if not data["manifest"]:
            from risgd_data.manifest import write_manifest
            write_manifest(manifest, os.path.join(run_dir, "manifest.yaml"))

    t0 = time.perf_counter() - wall_before
    # loss sum, steps, samples skipped since the last log; on the device, so NCCL can reduce it and
    # adding the loss does not wait for the GPU every step
    running = torch.zeros(3, dtype=torch.float64, device=device)
    last = {"train_loss": float("nan"), "test_acc": None}
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc=run_name(cfg), dynamic_ncols=True)
    batches = iter(loader)
    crash_at = int(os.environ.get("RISGD_TEST_KILL_AT_STEP", "-1"))
    coverage: dict[frozenset, float] = {}
    skipped_seen = loader.samples_skipped
    for step in range(start + 1, total_steps + 1):
        images, labels = next(batches)
        loss = F.cross_entropy(engine(images.to(device)), labels.to(device))
        engine.backward(loss)
        engine.step()
        if step == crash_at and rank == world_size - 1:  # fault-injection for tests: a real kill -9
            os.kill(os.getpid(), signal.SIGKILL)
        running[0] += loss.detach()
        running[1] += 1
        bar.update(1)
        if step % cfg["eval_every"] == 0 or step == total_steps:
            running[2] = loader.samples_skipped - skipped_seen
            skipped_seen = loader.samples_skipped
            # Telemetry only: one tiny collective per log interval, at a round boundary.
            dist.all_reduce(running)
            stats = engine.risgd.stats()
            metrics = {"step": step, "round": stats["rounds"], "epoch": step / steps_per_epoch,
                       "lr": scheduler.get_last_lr()[0], "train_loss": float(running[0] / running[1]),
                       "comm_rounds": stats["comm_rounds"], "comm_bytes": stats["bytes_allreduced"],
                       "comm_seconds": stats["comm_seconds"], "compute_seconds": stats["compute_seconds"],
                       "wall_seconds": time.perf_counter() - t0, "divergence": stats["divergence"],
                       "samples_skipped": int(running[2])}
            running.zero_()
            if not engine.risgd.active:
                engine.risgd.average_buffers()  # plain DeepSpeed leaves BatchNorm stats per rank
            if rank == 0:
                live = frozenset(range(world_size)) - engine.risgd.down_ranks
                if live not in coverage:
                    coverage[live] = live_coverage(manifest, index, live)
                metrics["data_coverage"] = coverage[live]  # of the training set, by the live ranks
                metrics.update(evaluate(engine.module, eval_loader, device, index["num_classes"]))
                best = max(best, metrics["test_acc"])
                bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", acc=f"{metrics['test_acc']:.1f}")
                if last["test_acc"] is None:  # the first measurement is enough to advise on tau
                    tqdm.write(f"cost model: {json.dumps(cost_advice(cfg, stats))}")
            tracker.log(metrics)
            last = metrics
        if (cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0) or step == total_steps:
            engine.save_checkpoint(ckpt_dir, tag=f"step{step}", client_state={
                "step": step, "wall_seconds": time.perf_counter() - t0, "best_test_acc": best})
    bar.close()

    stats = engine.risgd.stats()
    digest = model_digest(engine.module)
    summary = {"algorithm": cfg["algorithm"], "tau": tau, "mu": cfg["mu"], "world_size": world_size,
               "steps": total_steps, "comm_rounds": stats["comm_rounds"], "comm_bytes": stats["bytes_allreduced"],
               "comm_seconds": stats["comm_seconds"], "compute_seconds": stats["compute_seconds"],
               "wall_seconds": time.perf_counter() - t0, "final_test_acc": last.get("test_acc"),
               "best_test_acc": best, "final_train_loss": last["train_loss"], "seed": cfg["seed"],
               "partition": data["partition"], "batch_policy": data["batch_policy"],
               "divergence_mean": stats["divergence_mean"], "samples_skipped": loader.samples_skipped,
               "recipe": cfg["recipe"], "run_name": run_name(cfg), "model_sha256": digest,
               "min_data_coverage": min(coverage.values(), default=None),
               "rank_model_sha256": gather_digests(digest, world_size),
               "cost_model": cost_advice(cfg, stats)}
    if rank == 0:
        print(f"cost model: {json.dumps(summary['cost_model'])}", flush=True)
    tracker.finish(summary)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
