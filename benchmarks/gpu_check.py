"""GPU check: train.py's step time on this node against a bare PyTorch loop, and whether the step is
loader-bound. One command, run on a GPU node from the repository root:

    python benchmarks/gpu_check.py                      # every GPU, bf16 autocast, channels_last
    python benchmarks/gpu_check.py --gpus 1 --datasets cifar10 --precision fp32

For each dataset (CIFAR-10 format and ImageNet format, both synthetic: nothing is downloaded) it

1. writes the source once under --work (a CIFAR python tarball; an ILSVRC-2012-layout tree of
   ImageNet-sized photo-like JPEGs) and converts it with ``python -m data.make_shards``;
2. launches ``deepspeed --num_gpus N train.py --recipe recipes/cifar10_resnet44.yaml`` (or
   ``recipes/imagenet_resnet50.yaml``) with overrides: RI-SGD, --steps steps, tau --tau, the
   ``split`` batch policy (every rank's batch is exactly --batch), --precision, channels_last,
   NCCL between the node's GPUs;
3. reads the run's metrics.jsonl: the step time is the wall clock between the first and the last
   evaluation (evaluation time taken out) over the steps between them, so start-up and the first
   eval interval (cuDNN, allocator and loader warm-up) are not in it. ``compute_seconds`` (the
   engine's device time from forward to optimizer step) and ``comm_seconds`` over the same interval
   say how much of a step the GPU had work: the rest is waiting for the host, i.e. the loader;
4. times a bare PyTorch loop on one GPU: the same model (timm), batch, precision, memory format and
   optimizer (SGD, momentum, weight decay groups), on a batch already in GPU memory;
5. prints train.py throughput / bare loop (goal >= 0.95: the engine and the loader cost under 5%)
   and whether the step was loader-bound (the GPU idle more than 5% of a step);
6. ImageNet format, both JPEG decode paths (recipe key ``data.decode``): train.py once more with
   ``data.decode=gpu`` (row ``imagenet/gpu``: nvJPEG on the device, the workers only read and draw
   the crops), and the train loader alone, img/s of one rank's batches for decode=cpu and decode=gpu
   with the same workers (``--decode cpu`` leaves the GPU path out);
7. the round codecs (bf16, int8, int4) on the GPU: encode + decode of ResNet-50's 25.6 M values, the
   same code as on the CPU (``benchmarks/bench_codec.py --device cuda``).

Exit status: 0 done (the goals are reported, not enforced), 2 bad input or no GPU (one line), 1 a
launch or the work failed. ``--cpu-smoke`` runs the same plumbing on 2 CPU ranks with gloo and tiny
sizes, for a machine without a GPU (CI); its ratio means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from risgd_common.progress import watch
from risgd_tools.launch import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"cifar10": "recipes/cifar10_resnet44.yaml", "imagenet": "recipes/imagenet_resnet50.yaml"}
GPU_ROW = "imagenet/gpu"  # the ImageNet run again with data.decode=gpu
GOAL = 0.95
IDLE_LIMIT = 0.05


class CheckError(Exception):
    """Bad input: one line, exit 2."""


def _deepspeed_launcher() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    found = here if os.path.exists(here) else shutil.which("deepspeed")
    if not found:
        raise CheckError("the 'deepspeed' launcher is not on PATH: install requirements.txt (make test sets up .venv)")
    return found


def _run(cmd: list[str], log: str, env: dict | None = None, progress: list[str] | None = None) -> None:
    """Run a command from the repository root; its output goes to `log`. Failure: exit 1. With
    ``progress`` (the run names of a trainer launch) its step and time left are said on stderr."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if progress is not None:
            watch(proc, log, progress)
        proc.wait()
    if proc.returncode != 0:
        tail = open(log).read().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with status {proc.returncode}: see {log}")


# -- 1. synthetic sources and shards ---------------------------------------------------------------

def make_data(dataset: str, work: str, smoke: bool) -> str:
    """The dataset's shards under WORK/shards/DATASET (made once); returns that directory."""
    from risgd_data import synthetic

    shards = os.path.join(work, "shards", dataset)
    if os.path.exists(os.path.join(shards, "index.json")):
        return shards
    src_dir = os.path.join(work, "src")
    os.makedirs(src_dir, exist_ok=True)
    t0 = time.perf_counter()
    if dataset == "cifar10":
        src = os.path.join(src_dir, "cifar-10-python.tar.gz")
        n_train, n_test = (256, 64) if smoke else (10000, 1000)
        synthetic.write_cifar_tarball(src, "cifar10", n_train=n_train, n_test=n_test, seed=0)
    else:
        src = os.path.join(src_dir, "imagenet")
        n_train, n_val, classes = (48, 16, 4) if smoke else (4000, 500, 100)
        synthetic.write_imagenet_tree(src, n_train, n_val, classes=classes, seed=0,
                                      workers=max(1, min(16, os.cpu_count() or 1)))
    _run([sys.executable, "-m", "data.make_shards", "--dataset", dataset, "--src", src, "--out", shards,
          "--no-progress"], os.path.join(work, f"make_shards_{dataset}.log"))
    print(f"  {dataset}: synthetic source and shards written in {time.perf_counter() - t0:.0f} s ({shards})",
          flush=True)
    return shards


# -- 2./3. train.py and its record ------------------------------------------------------------------

def train_overrides(args: argparse.Namespace, dataset: str, shards: str, ranks: int) -> list[str]:
    over = [f"runs_dir={os.path.join(args.work, 'runs')}", f"run_name=gpu-check-{dataset}",
            "algorithm=risgd", f"mu={0.25 if ranks > 1 else 0.0}", f"tau={args.tau}", "warmup_sync_steps=0",
            f"steps={args.steps}", "epochs=0", f"eval_every={args.eval_every}", "checkpoint_every=0",
            "schedule.warmup_steps=0", f"data.shards={shards}", "data.manifest=null", "data.batch_policy=split",
            f"data.base_batch={args.batch[dataset]}", f"data.num_workers={args.num_workers}",
            f"precision={args.precision}", f"model.channels_last={str(args.channels_last).lower()}",
            "wandb.enabled=false"]
    if args.cpu_smoke and dataset == "imagenet":
        over.append("data.image_size=64")
    return over + args.override


def run_train(args: argparse.Namespace, dataset: str, shards: str, ranks: int, decode: str = "cpu") -> str:
    name = dataset if decode == "cpu" else f"{dataset}-gpu-decode"
    run_dir = os.path.join(args.work, "runs", f"gpu-check-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time (a finished run would be skipped)
    over = train_overrides(args, dataset, shards, ranks)
    if decode != "cpu":
        over = [o.replace(f"run_name=gpu-check-{dataset}", f"run_name=gpu-check-{name}") for o in over]
    cmd = command(RECIPES[dataset], ranks, [*over, f"data.decode={decode}"], trainer="train.py")  # the one launcher
    env = dict(os.environ)
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    _run(cmd, os.path.join(args.work, f"train_{name}.log"), env, progress=[f"gpu-check-{name}"])
    print(f"  {name}: train.py on {ranks} {'CPU ranks' if args.cpu_smoke else 'GPUs'} took "
          f"{time.perf_counter() - t0:.0f} s (log: {os.path.join(args.work, f'train_{name}.log')})", flush=True)
    return run_dir


def loader_rates(shards: str, device: str, batch: int, workers: int, steps: int, decodes: list[str]) -> dict:
    """img/s of one rank's train loader (its batches on `device`, synchronized) per decode path,
    after a warm-up of `workers` + 2 batches; median of 3 timed blocks of `steps` batches each."""
    import torch

    from risgd_data.index import load_index
    from risgd_data.loader import make_train_loader
    from risgd_data.manifest import build_manifest

    manifest = build_manifest(load_index(shards), 1, 0.0)
    cuda = torch.device(device).type == "cuda"
    rates = {}
    for decode in decodes:
        ld = make_train_loader(manifest, shards, 0, batch, num_workers=workers, pin_memory=cuda, decode=decode,
                               device=device)
        it = iter(ld)

        def take(n, it=it):
            for _ in range(n):
                x, _ = next(it)
                x = x.to(device, non_blocking=True)
            if cuda:
                torch.cuda.synchronize(device)

        take(workers + 2)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            take(steps)
            times.append(time.perf_counter() - t0)
        rates[decode] = batch * steps / statistics.median(times)
        it.close()  # the loader's workers end here
    return rates


def step_times(run_dir: str) -> dict:
    """Per-step seconds between the first and the last logged evaluation of rank 0's record."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if len(lines) < 2:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has {len(lines)} line(s): need 2 evaluations; "
                           "use more --steps or a smaller --eval-every")
    first, last = lines[0], lines[-1]
    steps = last["step"] - first["step"]
    evals = sum(line.get("eval_seconds", 0.0) for line in lines[:-1])  # evaluated inside the interval
    wall = last["wall_seconds"] - first["wall_seconds"] - evals
    compute = last["compute_seconds"] - first["compute_seconds"]
    comm = last["comm_seconds"] - first["comm_seconds"]
    return {"steps": steps, "from_step": first["step"], "to_step": last["step"], "step_s": wall / steps,
            "compute_s": compute / steps, "comm_s": comm / steps,
            "idle_share": max(0.0, 1.0 - (compute + comm) / wall) if wall > 0 else 0.0}


# -- 4. the bare loop ------------------------------------------------------------------------------

def bare_step_time(run_dir: str, shards: str, device: str, steps: int) -> float:
    """Seconds per step of a plain PyTorch loop with the run's model, batch, precision and optimizer
    on one device, with the batch already there (median of 3 timed blocks after a warm-up)."""
    import torch
    import torch.nn.functional as F
    import yaml

    import risgd_models

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)  # the resolved configuration train.py ran
    with open(os.path.join(shards, "index.json")) as f:
        index = json.load(f)
    data, opt = cfg["data"], cfg["optimizer"]
    size = data["image_size"] or (224 if cfg["data"]["dataset"] in ("imagenet", "imagefolder") else 32)
    fmt = torch.channels_last if cfg["model"]["channels_last"] else torch.contiguous_format
    torch.manual_seed(cfg["seed"])
    model = risgd_models.create_model(cfg["model"]["name"], num_classes=index["num_classes"], in_chans=3,
                                      drop_rate=cfg["model"]["drop_rate"]).to(device, memory_format=fmt)
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": opt["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=opt["lr"], momentum=opt["momentum"], nesterov=opt["nesterov"])
    batch = data["base_batch"]
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, index["num_classes"], (batch,), device=device)
    bf16 = cfg.get("precision") == "bf16"
    dev_type = torch.device(device).type

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(max(2, steps // 5)):  # warm-up: cuDNN algorithms, the caching allocator
        step()
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


# -- the command -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs (ranks) for train.py (default: all visible)")
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "imagenet"], choices=sorted(RECIPES),
                    help="which formats to check (default: both)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16 (torch autocast, fp32 weights) or fp32, for train.py and the bare loop (default bf16)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="model.channels_last for train.py and the bare loop (default on)")
    ap.add_argument("--cifar-batch", type=int, default=128, help="per-GPU batch for CIFAR-10 (default 128)")
    ap.add_argument("--imagenet-batch", type=int, default=64, help="per-GPU batch for ImageNet (default 64)")
    ap.add_argument("--steps", type=int, default=600, help="train.py steps per dataset (default 600)")
    ap.add_argument("--tau", type=int, default=50, help="RI-SGD tau; --steps must be a multiple (default 50)")
    ap.add_argument("--eval-every", type=int, default=200,
                    help="train.py evaluates (and logs) every this many steps; the step time is measured "
                    "from the first evaluation to the last (default 200)")
    ap.add_argument("--bare-steps", type=int, default=100, help="steps per timed block of the bare loop (default 100)")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="loader worker processes per rank (default: CPU cores / ranks, at most 8)")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "gpu_check"),
                    help="synthetic data, shards, runs and logs (default runs/gpu_check)")
    ap.add_argument("--decode", choices=["cpu", "both"], default="both",
                    help="ImageNet: both decode paths (data.decode cpu and gpu, default) or the CPU one only")
    ap.add_argument("--loader-steps", type=int, default=20,
                    help="batches per timed block of the loader img/s measurement (default 20)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: the same plumbing on 2 CPU ranks (gloo) with tiny sizes; the ratio means nothing")
    ap.add_argument("override", nargs="*", help="extra key=value recipe overrides passed to train.py")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.tau, args.eval_every, args.bare_steps = 20, 10, 10, 3
        args.cifar_batch, args.imagenet_batch = min(args.cifar_batch, 16), min(args.imagenet_batch, 4)
    return args


def check_args(args: argparse.Namespace) -> int:
    """Validate; return the number of ranks. Raises CheckError (one line, exit 2)."""
    for name in ("steps", "tau", "eval_every", "bare_steps", "cifar_batch", "imagenet_batch"):
        if getattr(args, name) < 1:
            raise CheckError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.tau:
        raise CheckError(f"--steps {args.steps} must be a multiple of --tau {args.tau} (the run ends on an average)")
    if args.steps < 2 * args.eval_every:
        raise CheckError(f"--steps {args.steps} must be >= 2 x --eval-every {args.eval_every}: the step time is "
                         "measured between two evaluations")
    for item in args.override:
        if "=" not in item:
            raise CheckError(f"override '{item}' must look like key=value")
    if args.cpu_smoke:
        ranks = 2
    else:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise CheckError("no CUDA GPU on this machine (torch.cuda.is_available() is False): run it on a GPU "
                             "node, or pass --cpu-smoke to check the plumbing only")
        count = torch.cuda.device_count()
        ranks = count if args.gpus is None else args.gpus
        if not 1 <= ranks <= count:
            raise CheckError(f"--gpus {args.gpus}: this node has {count} GPU(s)")
    if args.num_workers is None:
        args.num_workers = 0 if args.cpu_smoke else max(1, min(8, (os.cpu_count() or 1) // ranks))
    elif args.num_workers < 0:
        raise CheckError(f"--num-workers must be >= 0, got {args.num_workers}")
    return ranks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ranks = check_args(args)
        _deepspeed_launcher()
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.batch = {"cifar10": args.cifar_batch, "imagenet": args.imagenet_batch}
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    device = "cpu" if args.cpu_smoke else "cuda:0"
    if args.cpu_smoke:
        import torch

        torch.set_num_threads(1)  # as each of train.py's CPU ranks (OMP_NUM_THREADS=1)
    if not args.cpu_smoke:
        import torch

        print(f"gpu_check: {ranks} x {torch.cuda.get_device_name(0)}, {args.precision}, "
              f"channels_last={args.channels_last}, loader workers/rank {args.num_workers}", flush=True)
    results, rates = {}, {}
    gpu_decode = args.decode == "both" and not args.cpu_smoke  # no CUDA: train.py would refuse data.decode=gpu
    try:
        for dataset in args.datasets:
            shards = make_data(dataset, args.work, args.cpu_smoke)
            for decode in ("cpu", "gpu") if dataset == "imagenet" and gpu_decode else ("cpu",):
                run_dir = run_train(args, dataset, shards, ranks, decode)
                train = step_times(run_dir)
                bare = bare_step_time(run_dir, shards, device, args.bare_steps)
                if not args.cpu_smoke:
                    import torch

                    torch.cuda.empty_cache()  # the next dataset's train.py gets the memory back
                results[GPU_ROW if decode == "gpu" else dataset] = {
                    **train, "bare_step_s": bare, "ratio": bare / train["step_s"],
                    "loader_bound": train["idle_share"] > IDLE_LIMIT, "batch": args.batch[dataset], "ranks": ranks,
                    "run_dir": run_dir}
            if dataset == "imagenet":  # the GPU path's code runs on the CPU in --cpu-smoke
                decodes = ["cpu", "gpu"] if args.decode == "both" else ["cpu"]
                rates = loader_rates(shards, device, args.batch[dataset], args.num_workers, args.loader_steps,
                                     decodes)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(f"\n{'dataset':10s} {'batch':>5s} {'train.py ms':>11s} {'compute ms':>10s} {'comm ms':>8s} "
          f"{'GPU idle':>8s} {'bare ms':>8s} {'ratio':>6s}  verdict")
    for dataset, r in results.items():
        verdict = "ok" if r["ratio"] >= GOAL else f"below the goal {GOAL}"
        verdict += "; loader-bound" if r["loader_bound"] else "; not loader-bound"
        print(f"{dataset:10s} {r['batch']:5d} {r['step_s'] * 1e3:11.2f} {r['compute_s'] * 1e3:10.2f} "
              f"{r['comm_s'] * 1e3:8.2f} {100 * r['idle_share']:7.1f}% {r['bare_step_s'] * 1e3:8.2f} "
              f"{r['ratio']:6.3f}  {verdict}")
    print(f"ratio = bare loop step / train.py step (throughput of train.py relative to the bare loop; goal >= "
          f"{GOAL}); steps {next(iter(results.values()))['from_step']}..{next(iter(results.values()))['to_step']} "
          f"of train.py; GPU idle = the part of a step without compute or communication on the GPU "
          f"(loader-bound above {IDLE_LIMIT:.0%})")
    if rates:
        print(f"\nImageNet train loader alone, one rank, batch {args.batch['imagenet']}, {args.num_workers} workers, "
              f"batches on {device} (median of 3 blocks of {args.loader_steps} batches):")
        for decode, rate in rates.items():
            print(f"  data.decode={decode}: {rate:8.0f} img/s")
    # 7. the round codecs on this device: encode + decode of ResNet-50's 25.6 M values (benchmarks/bench_codec.py)
    codec_device = "cpu" if args.cpu_smoke else "cuda"
    print(f"\nround codecs on {codec_device} (python benchmarks/bench_codec.py --device {codec_device}):", flush=True)
    _run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_codec.py"), "--device", codec_device,
          *(["--values", "100000", "--repeats", "1"] if args.cpu_smoke else [])],
         os.path.join(args.work, "bench_codec.log"))
    print(open(os.path.join(args.work, "bench_codec.log")).read().rstrip())
    if args.cpu_smoke:
        print("(--cpu-smoke: CPU ranks and tiny sizes; the plumbing works, the figures mean nothing; data.decode=gpu "
              "ran its code on the CPU in the loader measurement only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "batch"}, "results": results,
                       "loader_img_s": rates}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
