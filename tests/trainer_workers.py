"""The trainer's named steps driven one by one, in a one-rank process group of its own (see
tests/test_trainer.py): ``python tests/trainer_workers.py SHARDS RUNS_DIR OUT.json``.

Run A trains to ``STOP`` through the named steps and writes a checkpoint there with :meth:`Trainer.checkpoint`
alone; run B, a new Trainer on the same run directory, resumes from it (``set_up``, ``join``) and goes on
to the end; run C is the same run in one :meth:`Trainer.fit`. What each stood at goes to OUT.json."""

from __future__ import annotations

import datetime
import json
import os
import sys

STEPS, STOP = 8, 5
OVERRIDES = ["algorithm=sync", "mu=0", "tau=1", f"steps={STEPS}", "eval_every=3", "checkpoint_every=0",
             "wandb.enabled=false"]


def standing(trainer) -> dict:
    """Where ``trainer`` stands, and its model's and schedule's state."""
    from risgd_common.hashing import sha256_tensors

    at = trainer.standing()
    return {"step": at.step, "best": at.best, "last_eval": at.last_eval, "last_ckpt": trainer.last_ckpt,
            "cursor": trainer.cursor, "lr": trainer.scheduler.get_last_lr()[0],
            "model": sha256_tensors(trainer.engine.module.state_dict().items())}


def main(shards: str, runs_dir: str, out: str) -> None:
    import risgd_ext
    from risgd_trainer.run_config import resolve_run
    from risgd_trainer.train import Trainer, one_rank_environment

    one_rank_environment()
    risgd_ext.init_distributed(timeout=datetime.timedelta(seconds=120))

    def run(name: str):
        return resolve_run("recipes/digits.yaml", [*OVERRIDES, f"data.shards={shards}", f"runs_dir={runs_dir}",
                                                   f"run_name={name}"], 1)

    a = Trainer(run("split"))  # the named steps in fit()'s order, stopped at STOP with a checkpoint
    a.set_up()
    a.join()
    a.open()
    while a.step < STOP:
        a.train_step(*a.batch())
        a.aftermath()
        if a.evaluation_due():
            a.evaluate()
    a.checkpoint()
    stopped = {**standing(a), "cursor": a.loader.cursor(a.step)}  # the data position the checkpoint holds
    a.bar.close()

    b = Trainer(run("split"))  # a new trainer on the same run directory: resumed from A's checkpoint
    b.set_up()
    b.join()
    resumed = standing(b)
    b.open()
    b.loop()
    b.finish()

    Trainer(run("whole")).fit()
    with open(out, "w") as f:
        json.dump({"stopped": stopped, "resumed": resumed, "checkpoints": sorted(os.listdir(a.checkpoints.dir))}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
