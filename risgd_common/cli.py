"""The one argument parser of every risgd command: bad arguments are one line and exit status 2.

    parser = Parser(prog=..., description=__doc__)   # argparse.ArgumentParser, but for its errors

argparse prints its usage block above the error; risgd's commands answer bad input with one line
``error: ... (see --help)`` naming the problem, as they do for every other bad input. A leaf module.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one ``error:`` line and exit status 2 (its
    subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")
