"""The averaging round on its own (risgd_ext.round): its life and its two seams, with today's
behaviour pinned, on a 1-rank gloo group in this process and on a real 4-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from risgd_common.layout import Layout, LayoutError
from risgd_ext.flat import SLOT, FlatModel
from risgd_ext.round import DISPLACEMENT, KEEP_PROGRESS, REPLACE, Averaging, Live, Round
from risgd_hosts.local import run_ranks


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))


def _averaging(module: torch.nn.Module, world: int, rank: int, node_size: int = 1, nodes=None, node_sum=False,
               measure=True) -> Averaging:
    params = [p for p in module.parameters()]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    return Averaging.build(params, buffers, 64, Layout(world, node_size), rank, nodes=nodes, node_sum=node_sum,
                           measure_divergence=measure)


def _drift(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=1e-2)
        for b in module.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=g))


@pytest.fixture
def one_rank():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_layout_is_the_one_place_ranks_map_to_workers():
    flat, node = Layout(4), Layout(8, 4)
    assert (flat.workers, flat.worker_of(3), list(flat.ranks_of(2)), flat.hierarchical) == (4, 3, [2], False)
    assert (node.workers, node.worker_of(5), node.local_of(5), list(node.ranks_of(1))) == (2, 1, 1, [4, 5, 6, 7])
    assert node.cross_ranks(2) == [2, 6] and node.ranks_of_workers({1, 0}) == list(range(8))
    with pytest.raises(LayoutError, match="node_size=3 does not divide the 8 ranks"):
        Layout(8, 3)


def test_contributions_follow_the_live_set():
    m = _model()
    live = Live.without(frozenset({1}), 3)
    assert live.workers == frozenset({0, 2}) and live.down == frozenset({1})
    params = list(m.parameters())
    flat = Averaging(FlatModel(params, []), None, Layout(3), 0)
    assert flat.contributions(live) == 2
    sync_nodes = Averaging(flat.model, None, Layout(6, 2), 0, node_sum=False)
    assert sync_nodes.contributions(live) == 2  # a synchronous node's ranks count once
    differing = Averaging(flat.model, None, Layout(6, 2), 0, node_sum=True)
    assert differing.contributions(live) == 4


def test_seam_what_a_round_sends_is_the_displacement(one_rank):
    m = _model()
    avg = _averaging(m, 1, 0)
    model = avg.model
    anchor = [a.clone() for a in model.anchors]
    _drift(m, 1)
    out = [torch.full_like(b, 7.0) for b in model.buffers]
    DISPLACEMENT.fill(model, out, live_here=True, measure=True)
    f = model.flats[0]
    d = f.params - anchor[0]
    assert torch.equal(out[0][: f.num_param_elems], d)
    assert torch.equal(out[0][f.num_param_elems:-SLOT], f.buffer[f.num_param_elems:-SLOT])  # buffers as they are
    assert out[0][-SLOT].item() == pytest.approx(torch.dot(d, d).item())  # ||d||² in the slot
    DISPLACEMENT.fill(model, out, live_here=False, measure=True)
    assert all(not o.any() for o in out)  # a down worker sends zeros


def test_seam_how_a_result_is_applied():
    m = _model()
    model = FlatModel(list(m.parameters()), [b for b in m.buffers() if b.is_floating_point()])
    x = [b.clone() for b in model.buffers]
    mean = [torch.rand_like(b) for b in x]
    sent = [b - 0.25 for b in x]  # progress since the send: 0.25 everywhere
    KEEP_PROGRESS.apply(model, mean, sent)
    expected = torch.add(mean[0], torch.sub(x[0], x[0] - 0.25))
    assert torch.equal(model.buffers[0][:-SLOT], expected[:-SLOT]) and not model.slot.any()
    REPLACE.apply(model, mean, [])
    assert torch.equal(model.buffers[0], mean[0])  # the average replaces the model


def test_blocking_round_on_one_rank(one_rank):
    m = _model()
    avg = _averaging(m, 1, 0)
    _drift(m, 2)
    x = [b.clone() for b in avg.model.buffers]
    r = avg.round(Live.without(frozenset(), 1))
    sent, waited, applied = r.start(), r.wait(), r.apply()
    n_elems = sum(b.numel() for b in x)
    assert sent.bytes_sent == 4 * n_elems and waited.traffic.inter_collectives >= 1
    assert applied.divergence == 0.0  # one worker: no spread
    assert torch.allclose(avg.model.buffers[0][:-SLOT], x[0][:-SLOT], atol=1e-6)
    p = avg.model.flats[0].num_param_elems
    assert torch.equal(avg.model.anchors[0], avg.model.buffers[0][:p])  # the anchor moved to the average
    with pytest.raises(RuntimeError, match="apply\\(\\) before wait\\(\\)"):
        avg.round(Live.without(frozenset(), 1)).apply()


def test_overlapped_round_on_one_rank_view_state_and_progress(one_rank):
    m = _model()
    avg = _averaging(m, 1, 0)
    _drift(m, 3)
    r = avg.round(Live.without(frozenset(), 1), apply_step=8)
    r.start()
    x_sent = [b.clone() for b in avg.model.buffers]
    _drift(m, 4)  # local steps go on while the round is in flight
    x_now = [b.clone() for b in avg.model.buffers]
    assert r.wait().comm_seconds >= 0.0 and r.complete
    with r.viewed():
        view = [b.clone() for b in avg.model.buffers]
    assert all(torch.equal(a, b) for a, b in zip(avg.model.buffers, x_now))  # put back exactly
    assert torch.allclose(view[0][:-SLOT], x_sent[0][:-SLOT], atol=1e-6)  # the average of one is x at the send
    state = r.state_dict()
    again = Round.from_state(avg, state)
    assert again.apply_step == 8 and again.live == r.live and again.num_live == 1
    again.apply()
    progress = x_now[0] - x_sent[0]
    assert torch.allclose(avg.model.buffers[0][:-SLOT], view[0][:-SLOT] + progress[:-SLOT], atol=1e-6)
    assert not avg.model.slot.any()


def _four_ranks(rank: int, world: int) -> dict:
    from risgd_ext.topology import build_node_groups

    dist.init_process_group("gloo")
    out = {}
    for name, down, overlapped in (("all", frozenset(), False), ("down3", frozenset({3}), False),
                                   ("overlap", frozenset(), True)):
        m = _model()  # the same anchor everywhere
        avg = _averaging(m, world, rank)
        _drift(m, 100 + rank)
        out[name + "_before"] = [b.clone() for b in avg.model.buffers]
        r = avg.round(Live.without(down, world), apply_step=1 if overlapped else None)
        reports = [r.start(), r.wait(), r.apply()]
        out[name] = [b.clone() for b in avg.model.buffers]
        out[name + "_divergence"] = reports[2].divergence
    nodes = build_node_groups(Layout(world, 2), rank)
    m = _model()
    avg = _averaging(m, world, rank, node_size=2, nodes=nodes, node_sum=True)
    _drift(m, 100 + rank)
    r = avg.round(Live.without(frozenset(), 2))
    reports = [r.start(), r.wait(), r.apply()]
    out["node"] = [b.clone() for b in avg.model.buffers]
    out["node_intra_bytes"] = sum(rep.traffic.intra_bytes for rep in reports)
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def four():
    return run_ranks(_four_ranks, 4, timeout=300)


def test_four_ranks_blocking_round_is_the_mean_and_bit_identical(four):
    for name in ("all", "down3", "overlap", "node"):
        assert all(torch.equal(four[0][name][0], r[name][0]) for r in four), name  # every rank, the same bits
    before = torch.stack([r["all_before"][0][:-SLOT].double() for r in four])
    assert torch.allclose(four[0]["all"][0][:-SLOT].double(), before.mean(0), atol=1e-6)
    live = torch.stack([r["down3_before"][0][:-SLOT].double() for r in four[:3]])
    assert torch.allclose(four[3]["down3"][0][:-SLOT].double(), live.mean(0), atol=1e-6)  # the down rank takes it
    assert four[0]["all_divergence"] > 0


def test_four_ranks_overlapped_round_applied_at_once_equals_blocking(four):
    # no step between send and apply: x - x_sent is exactly 0, so x̄ + 0 is the blocking round's x̄
    assert torch.equal(four[0]["overlap"][0][:-SLOT], four[0]["all"][0][:-SLOT])
    assert four[0]["overlap_divergence"] == four[0]["all_divergence"]


def test_four_ranks_node_level_round_is_the_same_mean(four):
    assert torch.allclose(four[0]["node"][0][:-SLOT], four[0]["all"][0][:-SLOT], atol=1e-6)
    assert four[0]["node_intra_bytes"] > 0  # the node's ranks summed on the intra-node link first
