"""``python -m risgd_planner``: the planner's command line (risgd_planner.cli, ``risgd-cost-model``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
