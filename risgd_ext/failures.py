"""Which workers are down in a given averaging round (the paper's section 4.4): the schedule lives in
:mod:`risgd_ext.membership`, the one owner of who is live; this name stays importable."""

from __future__ import annotations

from .membership import failed_workers

__all__ = ["failed_workers"]
