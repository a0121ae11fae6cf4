"""Fault injection for the crash tests, kept out of the product: put this folder on PYTHONPATH and
set RISGD_TEST_KILL_AT_STEP=N; the highest rank then kills itself with SIGKILL (a real kill -9)
right after its N-th optimizer step. Python imports ``sitecustomize`` at start-up in every process
the launcher starts; the hook is global to all torch optimizers, so train.py is not touched."""

import os

_AT = int(os.environ.get("RISGD_TEST_KILL_AT_STEP", "-1"))
_LAST = os.environ.get("RANK") is not None and os.environ.get("RANK") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)

if _AT > 0 and _LAST:
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _steps = [0]

    def _kill_at(optimizer, args, kwargs):
        _steps[0] += 1
        if _steps[0] == _AT:
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(_kill_at)
