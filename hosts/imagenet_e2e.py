"""The ImageNet recipe's whole path, at small scale, on 2 namespace test hosts x 2 ranks.

    sudo .venv/bin/python -m hosts.imagenet_e2e --work-dir runs/imagenet_e2e

Each step is the command a user runs on a real cluster, with a small synthetic data set:

1. synthetic ImageNet-layout JPEGs (ILSVRC-2012 tree, photo-like, ImageNet's sizes; no download);
2. ``python -m risgd_data.make_shards --dataset imagenet --src TREE --out SHARDS``;
3. ``python -m risgd_data.manifest build --workers 4 --mu 0.25 --partition iid``;
4. ``python -m hosts.netns_cluster --hosts 2 --ranks-per-host 2``: per-host replication with
   ``risgd_data.replicate``, then the stock ``deepspeed --no_ssh`` launch on each host of
   ``train.py --recipe recipes/imagenet_resnet50.yaml`` (timm ResNet-50, bf16 autocast) with the
   length, image size and batch scaled down by overrides;
5. the run's ``summary.json``: every rank's final model digest must be the same.

Exit status 0 when the digests agree, 1 when a step fails or they differ, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], what: str) -> None:
    print(f"[imagenet_e2e] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"error: {what} failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hosts.imagenet_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="where the tree, shards, manifest, hosts and run go")
    parser.add_argument("--train-images", type=int, default=64, help="synthetic training JPEGs (default 64)")
    parser.add_argument("--val-images", type=int, default=16, help="synthetic validation JPEGs (default 16)")
    parser.add_argument("--classes", type=int, default=4, help="classes (default 4)")
    parser.add_argument("--image-size", type=int, default=64, help="training crop in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    parser.add_argument("--tau", type=int, default=2, help="local steps per round (default 2)")
    parser.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="inter-host links (default 1000)")
    args = parser.parse_args(argv)
    if args.train_images < 4 * args.classes or args.val_images < 4 or args.steps < 1 or args.tau < 1 \
            or args.steps % args.tau or args.image_size < 32:
        print("error: need --train-images >= 4 x --classes, --val-images >= 4, --image-size >= 32 and --steps a "
              "positive multiple of --tau", file=sys.stderr)
        return 2

    from risgd_data.synthetic import write_imagenet_tree

    work = os.path.abspath(args.work_dir)
    tree, shards, manifest = (os.path.join(work, n) for n in ("tree", "shards", "m.yaml"))
    runs = os.path.join(work, "runs")
    os.makedirs(work, exist_ok=True)
    info = write_imagenet_tree(tree, args.train_images, args.val_images, classes=args.classes, seed=0)
    print(f"[imagenet_e2e] {info['images']} synthetic JPEGs, {info['mean_kb']:.0f} KB on average, under {tree}")
    py = sys.executable
    _run([py, "-m", "risgd_data.make_shards", "--dataset", "imagenet", "--src", tree, "--out", shards,
          "--shard-size", str(max(4, args.train_images // 8)), "--no-progress"], "make_shards")
    _run([py, "-m", "risgd_data.manifest", "build", "--index", shards, "--workers", "4", "--mu", "0.25",
          "--partition", "iid", "--seed", "0", "--out", manifest], "manifest")
    _run([py, "-m", "hosts.netns_cluster", "--hosts", "2", "--ranks-per-host", "2",
          "--bandwidth-mbit", f"{args.bandwidth_mbit:g}", "--manifest", manifest, "--source", shards,
          "--work-dir", os.path.join(work, "cluster"), "--timeout-s", "1200", "--",
          "train.py", "--recipe", "recipes/imagenet_resnet50.yaml", "data.shards={data}",
          f"data.manifest={manifest}", "epochs=0", f"steps={args.steps}", f"tau={args.tau}",
          f"eval_every={args.tau}", "warmup_sync_steps=0", "checkpoint_every=0", "schedule.warmup_steps=0",
          f"data.image_size={args.image_size}", "data.base_batch=2", "data.eval_batch=8", "data.num_workers=0",
          f"runs_dir={runs}", "run_name=imagenet-e2e", "wandb.mode=offline"], "2 hosts x 2 ranks")
    with open(os.path.join(runs, "imagenet-e2e", "summary.json")) as f:
        summary = json.load(f)
    digests = summary["rank_model_sha256"]
    same = len(digests) == 4 and len(set(digests)) == 1 and digests[0] == summary["model_sha256"]
    print(f"[imagenet_e2e] {summary['steps']} steps, {summary['comm_rounds']} rounds, "
          f"{summary['comm_bytes'] / 2**20:.0f} MiB averaged, test acc {summary['final_test_acc']:.1f}%; "
          f"every rank's model digest equal: {'yes' if same else 'NO'} ({digests[0][:12]}...)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
