"""The trainer, as a script of the checkout: ``deepspeed --num_gpus 4 train.py --recipe recipes/digits.yaml``.

The trainer itself is the installed module ``risgd_recipes.train`` (recipes/train.py): the same
command line as ``risgd-train`` or ``deepspeed ... --module risgd_recipes.train``; see its docstring
or ``--help``.
"""

import sys

from risgd_recipes.train import main

if __name__ == "__main__":
    sys.exit(main())
