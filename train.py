"""The trainer, as a script of the checkout: ``deepspeed --num_gpus 4 train.py --recipe recipes/digits.yaml``.

The trainer itself is the installed module ``risgd_trainer.train`` (trainer/train.py): the same
command line as ``risgd-train`` or ``deepspeed ... --module risgd_trainer.train``; see its docstring
or ``--help``.
"""

import sys

from risgd_trainer.train import main

if __name__ == "__main__":
    sys.exit(main())
