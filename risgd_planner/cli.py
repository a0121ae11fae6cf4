"""The planner's command line (``risgd-cost-model``, ``python -m risgd_planner``): when do local steps
pay off on a cluster, and what to run there. The model is :mod:`risgd_planner.model`.

The alpha-beta model of a ring all-reduce: S bytes over N ranks at link bandwidth B (bytes/s) with
per-message latency L take ``2(N-1) L + 2(N-1)/N * S / B`` seconds. A synchronous step costs compute +
one all-reduce of the gradients; a local step costs compute alone; RI-SGD adds one all-reduce of the
parameters (and BatchNorm buffers) every tau steps. Compute per step depends on the batch policy:
``split`` keeps the base batch (compute as SyncSGD), ``per_chunk`` draws a base batch from each of the
q chunks (about q times the compute): give the time you measured for the policy you run.

    python -m risgd_planner --nodes 8 --model resnet50 --bandwidth-gbit 10 --compute-ms 120
    python -m risgd_planner --nodes 8 --model resnet50 --bandwidth-gbit 10 --compute-ms 120 \\
        --risgd-compute-ms 200     # e.g. the per_chunk policy, measured
    python -m risgd_planner --nodes 8 --model-bytes 2647016 --bandwidth-gbit 1 --compute-ms 20

``--nodes M`` are the machines the --bandwidth-gbit link joins, of ``--ranks-per-node K`` ranks each
(default 1). ``--model NAME`` is looked up in timm's registry (timm's own models, e.g. resnet50); for
any other model, e.g. the CIFAR ResNets of risgd_models, pass its size with ``--model-bytes N``, from
``python -c "import risgd_models; print(risgd_models.model_bytes('resnet44_cifar'))"``.

Node hierarchy and overlapped averaging. With ``--ranks-per-node K`` the flat lines are for one ring
over all M*K ranks. At the node level the ranks inside a node either all-reduce their gradients every
step (``--tau-intra 0``, on the intra-node link, ``--intra-bandwidth-gbit``) or average parameters
every ``--tau-intra`` steps; across nodes a hierarchical round averages the parameters every ``--tau``
steps. With ``--overlap`` a round's cross-node all-reduce runs behind the next ``--overlap-delay D``
local steps (default tau) and only what D steps of compute do not hide is waited for (the round's
intra-node phases block, as in the engine). These flags add a ``hierarchical/overlapped:`` section
after the flat lines, which ends with ``hier_recommended_tau``: the smallest tau whose
``hier_comm_share`` is <= --target-share (a multiple of --tau-intra; with --overlap each round behind
tau steps of compute, or min(--overlap-delay, tau)), or ``none`` where the communication inside the
node alone, every step or every --tau-intra steps, is over the target at any tau. ``--compress``
lists each codec's cross-node round among the --nodes nodes and the tau it needs, and prices the
hierarchical section's cross-node phase with that codec's payload (the phases inside a node stay
fp32, as the engine runs them):

    python -m risgd_planner --nodes 4 --ranks-per-node 8 --model resnet50 --bandwidth-gbit 10 \\
        --compute-ms 120 --intra-bandwidth-gbit 100 --tau-intra 0 --overlap --overlap-delay 10

Each printed number says after it what it assumes, e.g. ``risgd_comm_share 0.0235  (at --tau 50:
...)`` and ``recommended_tau 11  (smallest tau with communication <= 10% of an RI-SGD step,
--target-share 0.1)``; the key stays first on its line. The model has no accuracy term: a
recommended tau, or a --tau, above 200 (the largest tau the project measured for accuracy, where
accuracy already falls) comes with a ``warning:`` line that says how far beyond it is and what to do
instead (a faster link, compressed rounds, the node level, or a higher --target-share).

The last line is the answer: ``answer:`` the configuration to use (the node level or not, the codec,
the tau: the smallest tau that meets --target-share among those weighed, see
``risgd_planner.model.plan``; the codecs only with --compress, else fp32) and, after ``run:``, the
command line that runs it (--recipe names the recipe).

train.py logs the same prediction for its own run (``summary.json``, key ``cost_model``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from risgd_common.cli import Parser
from risgd_common.install import command
from risgd_ext.codec import CODECS

from .model import (
    MEASURED_TAU_MAX,
    Plan,
    Prediction,
    beyond_measured,
    hierarchical_share_floor,
    plan,
    predict,
    predict_hierarchical,
    recommend_hierarchical_tau,
    recommend_rounds,
)


def _codec(value: str) -> str:
    """``--compress``: a registered codec or a variant of one (``topk0.01``)."""
    if value not in CODECS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a codec: use one of {CODECS.described()}")
    return value

# The recipe the answer's command line runs when --recipe is not given: the project's recipe of the default
# --model (resnet50); for another model the line names a placeholder.
DEFAULT_RECIPE = "recipes/imagenet_resnet50.yaml"


def format_prediction(p: Prediction) -> str:
    return "\n".join(f"  {k:<18} {v:.4f}" if isinstance(v, float) else f"  {k:<18} {v}" for k, v in asdict(p).items())


def format_annotated(fields: dict, notes: dict[str, str]) -> str:
    """``format_prediction``'s ``  key   value`` lines, each followed by what its number assumes:
    ``  key   value  (note)``; a None value prints as ``none``."""
    def value(v) -> str:
        return "none" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v}"

    return "\n".join(f"  {k:<18} {value(v)}" + (f"  ({notes[k]})" if notes.get(k) else "") for k, v in fields.items())


def _either(items: list[str], word: str = "or") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {word} {items[-1]}"


def main(argv: list[str] | None = None) -> int:
    script = os.path.basename(sys.argv[0])
    prog = script if script == "risgd-cost-model" else command("risgd_planner")
    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True,
                        help="nodes (M): the machines the --bandwidth-gbit link joins, each of --ranks-per-node K "
                             "ranks (default 1: M ranks)")
    parser.add_argument("--model", default="resnet50",
                        help="a model name timm's registry knows, whose fp32 parameters and floating-point "
                             "buffers one round averages (default resnet50)")
    parser.add_argument("--model-bytes", type=int, default=None,
                        help="bytes one all-reduce moves; takes precedence over --model (for models timm does "
                             "not know, e.g. risgd_models.model_bytes('resnet44_cifar'))")
    parser.add_argument("--bandwidth-gbit", type=float, required=True, help="link bandwidth in Gbit/s")
    parser.add_argument("--latency-us", type=float, default=50.0, help="per-message latency in us (default 50)")
    parser.add_argument("--compute-ms", type=float, required=True,
                        help="measured compute time of one synchronous step (forward+backward+update) in ms")
    parser.add_argument("--risgd-compute-ms", type=float, default=None,
                        help="measured compute of one RI-SGD local step under its batch policy (default: "
                             "--compute-ms, as for 'split'; 'per_chunk' takes about q times as long)")
    parser.add_argument("--tau", type=int, default=50, help="local steps per round (default 50)")
    parser.add_argument("--target-share", type=float, default=0.1,
                        help="communication share of a step to stay under when recommending tau: recommended_tau, each "
                             "codec's tau and hier_recommended_tau (default 0.1)")
    parser.add_argument("--ranks-per-node", type=int, default=1,
                        help="ranks per node (K, default 1): M=--nodes nodes of K ranks; adds the node level "
                             "(averaged hierarchically) to what is weighed")
    parser.add_argument("--tau-intra", type=int, default=0,
                        help="local steps between parameter averages inside a node; 0 (default): the node's ranks "
                             "all-reduce their gradients every step (needs --ranks-per-node > 1 when > 0)")
    parser.add_argument("--intra-bandwidth-gbit", type=float, default=100.0,
                        help="intra-node link bandwidth in Gbit/s (default 100)")
    parser.add_argument("--intra-latency-us", type=float, default=5.0,
                        help="intra-node per-message latency in us (default 5)")
    parser.add_argument("--overlap", action="store_true",
                        help="a round's all-reduce runs behind the next local steps' compute")
    parser.add_argument("--compress", type=_codec, default=None, metavar="CODEC",
                        help=f"one of {CODECS.described()}: also list every codec's round across the nodes (none: "
                             "fp32 all_reduce; the others: the two-phase compressed all-reduce) with the tau each "
                             "needs, and weigh every "
                             "codec whose accuracy was measured in the answer (without --compress: fp32 alone); "
                             "with --ranks-per-node, the node level's section prices its cross-node phase with "
                             "this codec")
    parser.add_argument("--overlap-delay", type=int, default=None,
                        help="steps after which an overlapped round's result is applied (default: --tau; "
                             "1..tau, needs --overlap)")
    parser.add_argument("--recipe", default=None,
                        help="the recipe the answer's command line runs (default: " + DEFAULT_RECIPE + " for "
                             "--model resnet50, else a placeholder RECIPE.yaml)")
    args = parser.parse_args(argv)
    for flag, ok in (("--nodes", args.nodes >= 1), ("--bandwidth-gbit", args.bandwidth_gbit > 0),
                     ("--latency-us", args.latency_us >= 0), ("--compute-ms", args.compute_ms > 0),
                     ("--risgd-compute-ms", args.risgd_compute_ms is None or args.risgd_compute_ms > 0),
                     ("--tau", args.tau >= 1), ("--target-share", 0 < args.target_share < 1),
                     ("--model-bytes", args.model_bytes is None or args.model_bytes > 0)):
        if not ok:
            parser.error(f"{flag} {getattr(args, flag[2:].replace('-', '_')):g} is out of range")
    delay = args.tau if args.overlap_delay is None else args.overlap_delay
    for flag, ok in (("--ranks-per-node", args.ranks_per_node >= 1), ("--tau-intra", args.tau_intra >= 0),
                     ("--intra-bandwidth-gbit", args.intra_bandwidth_gbit > 0),
                     ("--intra-latency-us", args.intra_latency_us >= 0), ("--overlap-delay", 1 <= delay <= args.tau)):
        if not ok:
            parser.error(f"{flag} {getattr(args, flag[2:].replace('-', '_')):g} is out of range")
    if args.tau_intra > 0 and args.ranks_per_node == 1:
        parser.error(f"--tau-intra {args.tau_intra} needs --ranks-per-node > 1 (a node of one rank has no average)")
    if args.overlap_delay is not None and not args.overlap:
        parser.error(f"--overlap-delay {args.overlap_delay} needs --overlap")
    if args.model_bytes is not None:
        nbytes, label = args.model_bytes, f"{args.model_bytes} bytes"
    else:
        # The name is resolved here, at the command line's edge, in timm's registry alone: the engine
        # imports no model zoo, and imports timm only when this command names a model.
        import timm

        if not timm.is_model(args.model):
            print(f"error: unknown model '{args.model}' for timm: pass --model-bytes N (python -c \"import "
                  f"risgd_models; print(risgd_models.model_bytes('{args.model}'))\")", file=sys.stderr)
            return 2
        model = timm.create_model(args.model, pretrained=False)
        tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        nbytes, label = 4 * sum(t.numel() for t in tensors), args.model
    ranks = args.nodes * args.ranks_per_node
    risgd_compute_s = None if args.risgd_compute_ms is None else args.risgd_compute_ms / 1e3
    p = predict(args.compute_ms / 1e3, nbytes, ranks, args.bandwidth_gbit, args.latency_us / 1e6, args.tau,
                args.target_share, risgd_compute_s)
    tau, k, m = args.tau, args.ranks_per_node, args.nodes
    shape = f"{_count(m, 'node')} of 1 rank" if k == 1 else f"{_count(m, 'node')} x {k} ranks ({ranks} ranks)"
    print(f"{label}: {nbytes / 2**20:.1f} MiB per all-reduce; {shape} at {args.bandwidth_gbit:g} "
          f"Gbit/s, {args.latency_us:g} us latency, {args.compute_ms:g} ms compute per step")
    node_level = k > 1 or args.overlap
    pct, target = f"{100 * args.target_share:g}%", f"--target-share {args.target_share:g}"
    over = f"over the {_count(m, 'node')}" if k == 1 else f"over {ranks} ranks in one ring"
    print(format_annotated(asdict(p), {
        "allreduce_s": f"one ring all-reduce of the {nbytes / 2**20:.1f} MiB "
                       + (f"{over}: " if k == 1 else f"over {ranks} ranks: ") + "a sync step's "
                       "gradients, or one RI-SGD round's parameters",
        "sync_step_s": f"--compute-ms + one gradient all-reduce per step {over}",
        "local_step_s": ("--risgd-compute-ms: an RI-SGD local step's compute under its batch policy, no "
                         "communication" if risgd_compute_s is not None else "--compute-ms: an RI-SGD local "
                         "step's compute, no communication; the split policy, for per_chunk pass --risgd-compute-ms"),
        "risgd_step_s": f"local step + one parameter all-reduce every --tau {tau} steps, per step",
        "sync_comm_share": f"the share of a sync step in its one gradient all-reduce per step {over}",
        "risgd_comm_share": f"at --tau {tau}: one all-reduce every {tau} steps, as a share of an RI-SGD step",
        "speedup_per_step": f"sync_step_s / risgd_step_s at --tau {tau}: per step, not to the same accuracy",
        "recommended_tau": f"smallest tau with communication <= {pct} of an RI-SGD step, {target}"}))
    if beyond_measured(tau):
        print(f"warning: --tau {tau} is {beyond_measured(tau)}: the numbers at --tau {tau} are times alone, at an "
              "accuracy not measured")
    if beyond_measured(p.recommended_tau):
        remedies = ["raise the bandwidth (--bandwidth-gbit)",
                    "compress the rounds (the codecs below)" if args.compress else
                    "compress the rounds (--compress int8 lists each codec's tau; int8 moves 3.9x fewer bytes, "
                    "int4 7.5x, at any number of nodes)",
                    "use the node level (hier_recommended_tau below)" if node_level else
                    "use the node level (--ranks-per-node K, --overlap)",
                    f"accept a higher --target-share than {args.target_share:g}"]
        print(f"warning: recommended_tau {p.recommended_tau} is {beyond_measured(p.recommended_tau)}: rather than "
              f"run it, {_either(remedies)}")
    local_s = args.compute_ms / 1e3 if risgd_compute_s is None else risgd_compute_s
    plans, answer = plan(args.compute_ms / 1e3, nbytes, m, k, args.bandwidth_gbit, args.latency_us / 1e6,
                         args.target_share, codecs=tuple(CODECS) if args.compress else ("none",),
                         tau_intra=args.tau_intra, intra_bandwidth_gbit=args.intra_bandwidth_gbit,
                         intra_latency_s=args.intra_latency_us / 1e6, overlap=args.overlap,
                         overlap_delay=args.overlap_delay, risgd_compute_s=risgd_compute_s)
    listed = tuple(CODECS) + (() if args.compress in tuple(CODECS) else (args.compress,))  # a variant: listed too
    options, pick = ([], None) if args.compress is None else recommend_rounds(local_s, nbytes,
                                     m, args.bandwidth_gbit, args.latency_us / 1e6, args.target_share, listed)
    if options:
        print(f"rounds across the {m} nodes, by payload: one cross-node collective per round among the {m} nodes"
              + (", without the node level's phases inside a node (for those: hier_recommended_tau below)"
                 if k > 1 else "") + f"; tau: the smallest with communication <= {pct} of an RI-SGD step, {target}:")
    for o in options:
        # the rounds alone are a configuration with one rank per node: "recommended" where the answer is it
        it = k == 1 and answer.node_size == 1 and not answer.overlap and answer.compress == o.compress
        mark = (" <- recommended" if o is pick and it else " <- smallest tau of these" if o is pick else
                " <- --compress" if o.compress == args.compress else "")
        unmeasured = "" if CODECS[o.compress].measured_on("flat") else (
            "  (accuracy not measured on flat rounds: never recommended)")
        print(f"  {o.compress:<8} payload {o.payload_bytes / 2**20:8.2f} MiB  round {o.round_s:8.3f} s  "
              f"tau {o.tau}{mark}{unmeasured}")
    far = [o for o in options if beyond_measured(o.tau)]
    if far:
        which = [f"{o.tau} ({o.compress}) " + ("is " if i == 0 else "") + f"{o.tau / MEASURED_TAU_MAX:.1f}x"
                 for i, o in enumerate(far)]
        remedies = ["raise the bandwidth (--bandwidth-gbit)",
                    "use the node level (hier_recommended_tau below)" if node_level else
                    "use the node level (--ranks-per-node K, --overlap)",
                    f"accept a higher --target-share than {args.target_share:g}"]
        print(f"warning: tau {_either(which, 'and')} beyond the largest tau measured for "
              f"accuracy ({MEASURED_TAU_MAX}, where accuracy already falls): rather than run "
              f"{'them' if len(far) > 1 else 'it'}, {_either(remedies)}")
    if node_level:
        net = dict(tau_intra=args.tau_intra, intra_bandwidth_gbit=args.intra_bandwidth_gbit,
                   intra_latency_s=args.intra_latency_us / 1e6, overlap=args.overlap, risgd_compute_s=risgd_compute_s,
                   compress=args.compress or "none")
        h = predict_hierarchical(args.compute_ms / 1e3, nbytes, m, k, args.bandwidth_gbit, args.latency_us / 1e6, tau,
                                 overlap_delay=delay, **net)
        inside = "node-synchronous (tau_intra 0)" if args.tau_intra == 0 else f"tau_intra {args.tau_intra}"
        print(f"hierarchical/overlapped: {m} nodes x {k} ranks, "
              f"{args.intra_bandwidth_gbit:g} Gbit/s and {args.intra_latency_us:g} us latency inside a node, "
              f"{inside}, tau {tau}, " + (f"overlap delay {delay} steps" if args.overlap else "no overlap")
              + (f", cross-node payload {args.compress}" if args.compress and args.compress != "none" else ""))
        hier_tau = recommend_hierarchical_tau(args.compute_ms / 1e3, nbytes, m, k, args.bandwidth_gbit,
                                              args.latency_us / 1e6, args.target_share,
                                              overlap_delay=args.overlap_delay, **net)
        if k == 1:
            round_note, intra_note = f"one round: a ring all-reduce among the {m} nodes", "none: one rank per node"
        else:
            round_note = (f"one hierarchical round: {'an average inside each node, then ' if args.tau_intra else ''}"
                          f"the cross-node all-reduce of the slices among the {m} nodes, then their broadcast inside "
                          "each node")
            intra_note = (f"the node's gradient all-reduce over its {k} ranks every step, at --intra-bandwidth-gbit "
                          f"{args.intra_bandwidth_gbit:g}" if args.tau_intra == 0 else
                          f"an average inside the node every --tau-intra {args.tau_intra} steps, per step")
        cross = "the cross-node phase, + the blocking phases inside the node" if k > 1 else "the round"
        floor = hierarchical_share_floor(args.compute_ms / 1e3, nbytes, k, tau_intra=args.tau_intra,
                                         intra_bandwidth_gbit=args.intra_bandwidth_gbit,
                                         intra_latency_s=args.intra_latency_us / 1e6, risgd_compute_s=risgd_compute_s)
        if hier_tau is not None:
            hier_note = (f"smallest tau with hier_comm_share <= {pct}, {target}: the node level's rounds among the {m} "
                         f"nodes of {k} rank{'s' if k > 1 else ''}"
                         + (f", a multiple of --tau-intra {args.tau_intra}" if args.tau_intra else "")
                         + (", each behind tau steps of compute (overlap delay tau)" if args.overlap
                            and args.overlap_delay is None else "")
                         + (f", each behind min(--overlap-delay {args.overlap_delay}, tau) steps of compute"
                            if args.overlap_delay is not None else "")
                         + (f"; the cross-node phase compressed with --compress {args.compress}, the phases inside "
                            "the node fp32" if args.compress and args.compress != "none" else ""))
        elif floor >= args.target_share:
            what = ("the node's gradient all-reduce every step" if args.tau_intra == 0 else
                    f"the average inside the node every --tau-intra {args.tau_intra} steps")
            fix = ("average inside the node every --tau-intra steps" if args.tau_intra == 0 else
                   "a larger --tau-intra")
            hier_note = (f"no tau reaches hier_comm_share <= {pct}, {target}: {what} alone is a share {floor:.4f} of "
                         f"a step at any tau; {fix}, a faster node link (--intra-bandwidth-gbit) or a --target-share "
                         f"above {floor:.4f}")
        else:
            hier_note = (f"no tau a run could use reaches hier_comm_share <= {pct}, {target}: the share tends to "
                         f"{floor:.4f} as tau grows, a hair below it; accept a higher --target-share")
        print(format_annotated({**asdict(h), "hier_recommended_tau": hier_tau}, {
            "round_s": round_note,
            "intra_step_comm_s": intra_note,
            "exposed_round_s": (f"what {delay} steps of compute, the overlap delay, leave of {cross}" if args.overlap
                                else "all of the round: the steps wait for it, no --overlap"),
            "hier_step_s": f"local step + intra_step_comm_s + exposed_round_s / {tau}, at --tau {tau}",
            "hier_comm_share": f"at --tau {tau}: the share of a node-level step spent communicating",
            "speedup_vs_sync": f"the flat sync_step_s, one ring over all {ranks} ranks, / hier_step_s",
            "speedup_vs_risgd": f"the flat risgd_step_s at --tau {tau}, one ring over all {ranks} ranks, / "
                                "hier_step_s",
            "hier_recommended_tau": hier_note}))
        if hier_tau is not None and beyond_measured(hier_tau):
            remedies = ["raise the bandwidth (--bandwidth-gbit)"]
            if not args.overlap:
                remedies.append("hide the rounds behind compute (--overlap)")
            if k > 1 and args.tau_intra == 0:
                remedies.append("leave the rounds more of the share (--tau-intra: average inside the node every few "
                                "steps, not every step)")
            remedies.append(f"accept a higher --target-share than {args.target_share:g}")
            print(f"warning: hier_recommended_tau {hier_tau} is {beyond_measured(hier_tau)}: rather than run it, "
                  f"{_either(remedies)}")
    recipe = args.recipe or (DEFAULT_RECIPE if args.model_bytes is None and args.model == "resnet50"
                             else "RECIPE.yaml")
    print(answer_line(plans, answer, m, k, args.target_share, recipe,
                      compared=args.compress is not None, overlap=args.overlap))
    return 0


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run_command(p: Plan, recipe: str) -> str:
    """The command line that runs plan ``p`` with ``recipe`` on a cluster: DeepSpeed's launcher over a
    hostfile (docs/clusters.md), the plan's recipe overrides after the recipe."""
    return f"deepspeed --hostfile hostfile train.py --recipe {recipe} " + " ".join(p.overrides())


def answer_line(plans: list[Plan], pick: Plan, nodes: int, ranks_per_node: int, target_share: float,
                recipe: str, compared: bool = True, overlap: bool = False) -> str:
    """The command's last line: ``answer:`` the configuration to use (node level or not, codec, tau), the
    taus it was picked from (:func:`risgd_planner.model.plan`'s), and after ``; run: `` the command line
    that runs it."""
    m, k = nodes, ranks_per_node
    if pick.node_size > 1:
        where = (f"the node level (node_size={k}: {_count(m, 'worker')}, each a node of {k} ranks"
                 + (f", averaging inside it every {pick.tau_intra} steps" if pick.tau_intra else "") + ")")
    elif k > 1:
        where = f"no node level (node_size=1: {m * k} workers, every rank one, {k} per node)"
    else:
        where = f"no node level (node_size=1: {_count(m, 'worker')}, one per node)"
    if pick.overlap:
        where += ", the rounds overlapped" + ("" if pick.overlap_delay is None else
                                              f" (delay {min(pick.overlap_delay, pick.tau)} steps)")
    codec = pick.compress + (" (fp32)" if pick.compress == "none" else "")
    far = beyond_measured(pick.tau)
    flat = [p for p in plans if p.node_size == 1 and not p.overlap]
    weighed = ["no node level: " + ", ".join(f"{p.compress} {p.tau}" for p in flat)]
    if k > 1 or overlap:  # the node level's plans; a codec left out there reaches no tau (none)
        taus = {p.compress: p.tau for p in plans if p not in flat}
        label = ("node level" if k > 1 else "") + (" overlapped" if overlap else "")
        codecs = dict.fromkeys([*(p.compress for p in flat), *taus])  # int2: weighed at the node level only
        weighed.append(label.strip() + ": " + ", ".join(f"{c} {taus.get(c, 'none')}" for c in codecs))
    why = (f"the smallest tau with communication <= {100 * target_share:g}% of a step, --target-share "
           f"{target_share:g}, of those weighed, tau by codec: " + "; ".join(weighed)
           + ("" if compared else "; fp32 alone: --compress int8 weighs the codecs too"))
    return (f"answer: {where}, compress {codec}, tau {pick.tau}"
            + (f", {far}: the model has no accuracy term" if far else "")
            + f" ({why}); run: {run_command(pick, recipe)}")


if __name__ == "__main__":
    sys.exit(main())
