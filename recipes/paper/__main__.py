"""``python -m recipes.paper``: the command (:mod:`recipes.paper.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
