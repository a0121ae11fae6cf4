"""The planner: which tau, codec and node level to run on a cluster, from an alpha-beta model of its
links (``model.py``), and the command line that prints it (``cli.py``: ``risgd-cost-model``,
``python -m risgd_planner``).

Its layer is above the engine and below the trainer: it reads the engine's codec registry
(``risgd_ext.codec``, the one place a codec's bytes are written) and imports nothing of the data, the
trainer, the tools or the hosts; the engine never imports it (the trainer does, for a run's
``summary.json`` key ``cost_model``). The names below are the model's and the command's; the old
path ``risgd_ext.cost_model`` is this package under its former name (``risgd_common.aliases.MOVED``).
"""

from .cli import format_annotated, format_prediction, main
from .model import (
    MEASURED_TAU_MAX,
    OUTER_ADVICE,
    HierarchicalPrediction,
    Plan,
    Prediction,
    RoundOption,
    RoundParts,
    advise,
    beyond_measured,
    effective_bandwidth,
    exposed_round_seconds,
    exposed_seconds,
    flat_round_seconds,
    hierarchical_round_parts,
    hierarchical_round_seconds,
    hierarchical_share_floor,
    payload_bytes,
    plan,
    predict,
    predict_hierarchical,
    predict_hierarchical_run_seconds,
    predict_run_seconds,
    recommend_hierarchical_tau,
    recommend_rounds,
    recommend_tau,
    ring_allreduce_seconds,
    ring_seconds,
    round_seconds,
)

__all__ = ["MEASURED_TAU_MAX", "OUTER_ADVICE", "HierarchicalPrediction", "Plan", "Prediction", "RoundOption",
           "RoundParts", "advise", "beyond_measured", "effective_bandwidth", "exposed_round_seconds",
           "exposed_seconds", "flat_round_seconds", "format_annotated", "format_prediction",
           "hierarchical_round_parts", "hierarchical_round_seconds", "hierarchical_share_floor", "main",
           "payload_bytes", "plan", "predict", "predict_hierarchical", "predict_hierarchical_run_seconds",
           "predict_run_seconds", "recommend_hierarchical_tau", "recommend_rounds", "recommend_tau",
           "ring_allreduce_seconds", "ring_seconds", "round_seconds"]
