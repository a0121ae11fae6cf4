"""Redundancy manifest: properties over many (p, mu) pairs, partitions, check, CLI."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from risgd_data.errors import DataError
from risgd_data.index import load_index, split_arrays
from risgd_data.manifest import (
    build_manifest,
    check_manifest,
    chunk_draw_scales,
    load_manifest,
    rank_chunk_ids,
    steps_per_epoch,
    validate_manifest_params,
    write_manifest,
)
from risgd_data.partition import parse_scheme, partition, resolve_chunks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def index(digits_dir):
    return load_index(digits_dir)


def _cases():
    for p in (1, 2, 3, 4, 5, 7, 8):
        mus = {0.0, 1 / p, 0.1, 0.25, 0.37, 0.5, (p - 1) / p, 0.5 * (p - 1) / p}
        for mu in sorted(m for m in mus if m <= (p - 1) / p + 1e-12):
            yield p, mu, 0.0
    for p, mu, std in ((4, 0.25, 0.05), (8, 0.3, 0.2), (5, 0.1, 0.5), (3, 0.6, 0.3)):
        yield p, mu, std


def _assert_properties(m: dict, index: dict):
    a = split_arrays(index)
    n, p = a.samples, m["workers"]
    chunks = resolve_chunks(m["chunks"], a.labels)
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n  # balanced partition
    assert len(np.unique(np.concatenate(chunks))) == n
    covered = np.zeros(n, dtype=int)
    for j, r in enumerate(m["ranks"]):
        assert 0 <= r["mu"] <= (p - 1) / p + 1e-9
        assert r["gamma"] == pytest.approx(1 / p + r["mu"])
        extra = r["mu"] * p
        k = int(np.floor(extra + 1e-9))
        # Cyclic structure: own chunk, then j+1 .. j+k, then the partial j+k+1.
        assert [c["chunk"] for c in r["chunks"][: k + 1]] == [(j + i) % p for i in range(k + 1)]
        partial = r["chunks"][k + 1:]
        assert len(partial) <= 1
        if partial:
            c = partial[0]
            assert c["chunk"] == (j + k + 1) % p
            assert c["fraction"] == pytest.approx(extra - k, abs=1e-6)
            # Fractional subset size within one sample of fraction * |chunk|.
            assert abs(c["subset"]["count"] - (extra - k) * sizes[c["chunk"]]) <= 1
        ids = rank_chunk_ids(m, index, j)
        held = np.unique(np.concatenate(ids))
        covered[held] += 1
        assert len(held) == r["samples"]
        assert abs(len(held) / n - r["gamma"]) <= (len(r["chunks"]) + 1) / n
    assert covered.min() >= 1  # every sample covered
    hist = {int(k): int(v) for k, v in zip(*np.unique(covered, return_counts=True))}
    assert hist == m["summary"]["replication_histogram"]


@pytest.mark.parametrize("partition_", ["iid", "label_sorted", "dirichlet:0.5"])
def test_properties_many_p_mu(index, partition_):
    count = 0
    for p, mu, std in _cases():
        m = build_manifest(index, p, mu, partition_, seed=7, hetero_std=std)
        _assert_properties(m, index)
        assert check_manifest(m, index) == [], (p, mu, std)
        count += 1
    assert count > 40


def test_paper_examples(index):
    n = split_arrays(index).samples
    m = build_manifest(index, 4, 0.25)
    assert [c["chunk"] for c in m["ranks"][0]["chunks"]] == [0, 1]
    assert [c["chunk"] for c in m["ranks"][3]["chunks"]] == [3, 0]
    m = build_manifest(index, 4, 0.5)
    assert [c["chunk"] for c in m["ranks"][0]["chunks"]] == [0, 1, 2]
    m = build_manifest(index, 4, 0.1)
    r0 = m["ranks"][0]["chunks"]
    assert [(c["chunk"], c["fraction"]) for c in r0] == [(0, 1.0), (1, pytest.approx(0.4))]
    assert r0[1]["subset"]["count"] == round(0.4 * (n // 4))
    assert m["summary"]["sum_gamma"] == pytest.approx(1 + 4 * 0.1)


def test_hetero_draws_are_clipped_and_seeded(index):
    a = build_manifest(index, 8, 0.3, hetero_std=0.5, seed=1)
    b = build_manifest(index, 8, 0.3, hetero_std=0.5, seed=1)
    mus = [r["mu"] for r in a["ranks"]]
    assert mus == [r["mu"] for r in b["ranks"]]
    assert len(set(mus)) > 1 and min(mus) >= 0 and max(mus) <= 7 / 8
    assert min(mus) == 0 or max(mus) == 7 / 8  # std 0.5 around 0.3 hits a clip bound


def test_mu_out_of_range(index, tmp_path):
    with pytest.raises(DataError, match=r"--mu 0\.8 .*\[0, 0\.75\]"):
        build_manifest(index, 4, 0.8)
    with pytest.raises(DataError, match="--mu"):
        build_manifest(index, 4, -0.1)
    with pytest.raises(DataError, match="--partition"):
        build_manifest(index, 4, 0.1, partition="dirichlet:-1")


def test_coop(index):
    m = build_manifest(index, 4, 0.0, mode="coop")
    n = split_arrays(index).samples
    assert m["chunks"] == [{"id": 0, "samples": n, "runs": [[0, n]], "shards": m["chunks"][0]["shards"]}]
    for j, r in enumerate(m["ranks"]):
        assert r["gamma"] == pytest.approx(1.0) and r["samples"] == n
        assert len(rank_chunk_ids(m, index, j)[0]) == n
    assert m["summary"]["replication_histogram"] == {4: n}
    assert m["epoch_samples"] == n // 4
    assert check_manifest(m, index) == []


def test_partitions(index):
    labels = split_arrays(index).labels
    for p in (2, 3, 4, 6, 9, 10):
        ls = resolve_chunks(partition(labels, p, "label_sorted"), labels)
        assert max(map(len, ls)) - min(map(len, ls)) <= 1
        # label_sorted: chunk j's labels all <= chunk j+1's labels (non-iid by construction).
        for x, y in zip(ls, ls[1:]):
            assert labels[x].max() <= labels[y].min()
    iid = resolve_chunks(partition(labels, 4, "iid"), labels)
    assert all(len(np.unique(labels[c])) == 10 for c in iid)
    d1 = resolve_chunks(partition(labels, 4, "dirichlet:0.1", seed=0), labels)
    d2 = resolve_chunks(partition(labels, 4, "dirichlet:100", seed=0), labels)
    skew = lambda cs: np.mean([np.bincount(labels[c], minlength=10).max() / len(c) for c in cs])  # noqa: E731
    assert skew(d1) > skew(d2)
    assert max(map(len, d1)) - min(map(len, d1)) <= 1


def test_yaml_roundtrip_and_unsafe_names(index, tmp_path):
    m = build_manifest(index, 4, 0.1, "label_sorted", seed=3)
    path = str(tmp_path / "m.yaml")
    write_manifest(m, path)
    text = open(path).read()
    assert text.startswith("#") and "ranks:" in text and "subset:" in text and len(text) < 60_000
    assert load_manifest(path) == m
    bad = copy.deepcopy(m)
    bad["ranks"][0]["shards"][0] = "../../etc/passwd"
    write_manifest(bad, path)
    with pytest.raises(DataError, match="unsafe shard name"):
        load_manifest(path)


def test_check_finds_problems(index, digits_dir, tmp_path):
    m = build_manifest(index, 4, 0.1, "label_sorted")
    assert check_manifest(m, index, shard_dir=digits_dir) == []
    tampered = []
    t = copy.deepcopy(m)
    t["index"]["shards"]["train"][2]["sha256"] = "0" * 64
    tampered.append((t, "sha256"))
    t = copy.deepcopy(m)
    t["ranks"][1]["chunks"][1]["subset"]["count"] += 3
    tampered.append((t, "subset"))
    t = copy.deepcopy(m)
    t["ranks"][2]["chunks"] = t["ranks"][2]["chunks"][1:]
    tampered.append((t, "cyclic"))
    t = copy.deepcopy(m)
    t["ranks"][0]["gamma"] = 0.9
    tampered.append((t, "gamma"))
    t = copy.deepcopy(m)
    t["summary"]["replication_histogram"] = {1: 1437}
    tampered.append((t, "histogram"))
    for t, word in tampered:
        problems = check_manifest(t, index)
        assert problems and any(word in p for p in problems), (word, problems)
    # Shard presence and checksum against a directory.
    d = tmp_path / "shards"
    shutil.copytree(digits_dir, d)
    os.remove(d / "train-000003.tar")
    with open(d / "train-000004.tar", "r+b") as f:
        f.seek(700)
        f.write(b"X")
    problems = check_manifest(m, index, shard_dir=str(d))
    assert any("train-000003.tar missing" in p for p in problems)
    assert any("train-000004.tar" in p and "sha256" in p for p in problems)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.manifest", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_build_check(digits_dir, tmp_path):
    assert "build" in _run("--help").stdout
    assert "--hetero-std" in _run("build", "--help").stdout
    assert "--shard-dir" in _run("check", "--help").stdout
    out = str(tmp_path / "m.yaml")
    ix = os.path.join(digits_dir, "index.json")
    r = _run("build", "--index", ix, "--workers", "4", "--mu", "0.1", "--partition", "label_sorted",
             "--seed", "2", "--hetero-std", "0.05", "--out", out)
    assert r.returncode == 0, r.stderr
    r = _run("check", out, "--index", ix)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    text = open(out).read().replace(load_manifest(out)["index"]["shards"]["train"][0]["sha256"], "f" * 64)
    open(out, "w").write(text)
    r = _run("check", out, "--index", ix)
    assert r.returncode == 2 and "problem" in r.stdout
    r = _run("build", "--index", ix, "--workers", "4", "--mu", "0.9", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--mu" in r.stderr and "[0, 0.75]" in r.stderr


def test_cli_check_covers_val_shards(digits_dir, tmp_path):
    # A truncated val shard used to pass `check` (only train shards were hashed) and fail at training.
    d = tmp_path / "shards"
    shutil.copytree(digits_dir, d)
    ix = str(d / "index.json")
    out = str(tmp_path / "m.yaml")
    r = _run("build", "--index", ix, "--workers", "4", "--mu", "0.25", "--out", out)
    assert r.returncode == 0, r.stderr
    assert _run("check", out, "--index", ix, "--shard-dir", str(d)).returncode == 0
    victim = d / "val-000000.tar"
    os.truncate(victim, victim.stat().st_size // 2)
    for extra in (["--shard-dir", str(d)], []):  # explicit, and the default (the index's directory)
        r = _run("check", out, "--index", ix, *extra)
        assert r.returncode == 2, r.stdout + r.stderr
        problems = [line for line in r.stdout.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and "val-000000.tar" in problems[0] and "sha256" in problems[0], r.stdout
    os.remove(victim)
    r = _run("check", out, "--index", ix, "--shard-dir", str(d))
    assert r.returncode == 2 and "val-000000.tar missing" in r.stdout
    assert "exit" in _run("check", "--help").stdout and "2" in _run("check", "--help").stdout


def test_cli_exit_codes(digits_dir, tmp_path):
    ix = os.path.join(digits_dir, "index.json")
    out = str(tmp_path / "m.yaml")
    # Bad input: one `error:` line and exit 2. The parameters are checked before the index is read.
    r = _run("build", "--index", str(tmp_path / "nowhere"), "--workers", "4", "--mu", "0.9", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --mu 0.9"), r.stderr
    assert "--mu 0.9 is out of range: must be in [0, 0.75] = [0, (p-1)/p] for --workers 4" in r.stderr
    for args, word in ((["--workers", "0"], "--workers 0"), (["--workers", "4", "--partition", "dirichlet:0"],
                                                             "--partition"),
                       (["--workers", "2000"], "--workers 2000"), (["--workers", "2", "--hetero-std", "-1"],
                                                                   "--hetero-std")):
        r = _run("build", "--index", ix, *args, "--out", out)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and word in r.stderr, (args, r.stderr)
    r = _run("build", "--index", str(tmp_path / "nowhere"), "--workers", "4", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "index" in r.stderr and "make_shards" in r.stderr
    assert _run("build", "--index", ix, "--workers", "4", "--mu", "0.25", "--out", out).returncode == 0
    r = _run("check", str(tmp_path / "missing.yaml"), "--index", ix)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.yaml" in r.stderr
    # A structurally malformed manifest is bad input too (it used to end in a traceback, exit 1).
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nindex: 3\n")
    r = _run("check", str(bad), "--index", ix)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.yaml" in r.stderr and "malformed" in r.stderr
    bad.write_text("version: 1\nindex: [\n")
    r = _run("check", str(bad), "--index", ix)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid YAML" in r.stderr
    # The work itself failing (here: --out cannot be created) is exit 1, still one line.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run("build", "--index", ix, "--workers", "4", "--out", str(blocker / "m.yaml"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
    # argparse usage errors: 2.
    assert _run("build", "--index", ix).returncode == 2


def test_validate_manifest_params_needs_no_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no shards, no index anywhere
    for args in ((4, 0.0, "iid"), (4, 0.75, "label_sorted"), (1, 0.0, "dirichlet:0.5"), (8, 0.3, "iid", 0.2),
                 (4, 5.0, "iid", 0.0, "coop"), (np.int64(3), 2 / 3, "dirichlet:1e-3")):
        validate_manifest_params(*args)
    bad = [
        ((4, 0.9, "iid"), "--mu 0.9 is out of range: must be in [0, 0.75] = [0, (p-1)/p] for --workers 4"),
        ((4, -0.1, "iid"), "--mu -0.1 is out of range"),
        ((1, 0.5, "iid"), "--mu 0.5 is out of range: must be in [0, 0]"),
        ((4, float("nan"), "iid"), "--mu nan is out of range"),
        ((0, 0.0, "iid"), "--workers 0 is invalid"),
        ((2.5, 0.0, "iid"), "--workers 2.5 is invalid"),
        ((4, 0.1, "iid", -0.5), "--hetero-std -0.5 is invalid"),
        ((4, 0.1, "iid", float("nan")), "--hetero-std nan is invalid"),
        ((4, 0.1, "iid", 0.0, "sync"), "--mode 'sync' is invalid"),
        ((4, 0.1, "dirichlet:0"), "--partition 'dirichlet:0' is invalid"),
        ((4, 0.1, "dirichlet:x"), "--partition 'dirichlet:x' is invalid"),
        ((4, 0.1, "label-sorted"), "--partition 'label-sorted' is invalid"),
        ((4, 0.0, "typo", 0.0, "coop"), "--partition 'typo' is invalid"),
    ]
    for args, msg in bad:
        with pytest.raises(DataError) as e:
            validate_manifest_params(*args)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), (args, str(e.value))
    assert os.listdir(tmp_path) == []
    # The partition spelling has one parser, shared with data.partition.
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5) and parse_scheme("iid") == ("iid", None)
    with pytest.raises(DataError) as e:
        parse_scheme("dirichlet:-1")
    with pytest.raises(DataError) as v:
        validate_manifest_params(4, 0.1, "dirichlet:-1")
    assert str(e.value) == str(v.value)


def test_build_uses_the_same_validator(index):
    # One rule per key: build_manifest raises exactly what the index-free validator raises.
    for args in ((4, 0.9, "iid", 0.0, "risgd"), (0, 0.0, "iid", 0.0, "risgd"), (4, 0.1, "iid", -1.0, "risgd"),
                 (4, 0.1, "dirichlet:0", 0.0, "risgd"), (4, 0.1, "iid", 0.0, "sync"),
                 (4, 0.0, "bogus", 0.0, "coop")):
        workers, mu, part, std, mode = args
        with pytest.raises(DataError) as v:
            validate_manifest_params(workers, mu, part, std, mode)
        with pytest.raises(DataError) as b:
            build_manifest(index, workers, mu, part, hetero_std=std, mode=mode)
        assert str(b.value) == str(v.value)
    n = split_arrays(index).samples
    validate_manifest_params(n + 1, 0.0, "iid")  # needs the index: only build_manifest knows n
    with pytest.raises(DataError, match=f"--workers {n + 1} is invalid: must be between 1 and the {n} training"):
        build_manifest(index, n + 1, 0.0)


def test_steps_per_epoch(index):
    for mode, mu in (("risgd", 0.1), ("coop", 0.0)):
        m = build_manifest(index, 4, mu, mode=mode)
        e = m["epoch_samples"]
        assert e == (min(c["samples"] for c in m["chunks"]) if mode == "risgd" else split_arrays(index).samples // 4)
        for b in (1, 7, 16, 128, e, e + 1, 10 * e):
            assert steps_per_epoch(m, b) == max(1, e // b)
        assert steps_per_epoch(m, 10 * e) == 1
        with pytest.raises(DataError, match="base_batch 0"):
            steps_per_epoch(m, 0)


def test_failed_write_keeps_old_manifest_and_leaves_no_temp(index, tmp_path):
    m = build_manifest(index, 2, 0.5)
    path = tmp_path / "m.yaml"
    write_manifest(m, str(path))
    before = path.read_bytes()
    bad = dict(m, junk=object())  # not representable: the YAML dump fails half way
    with pytest.raises(Exception, match="represent"):
        write_manifest(bad, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.yaml"]


def test_a_lost_workers_chunks_are_still_drawn_at_their_share(index, digits_dir):
    """Held and drawn (live recovery): after worker 3 of p=4, mu=0.5 is lost, each chunk a live worker holds
    is drawn at its full share of a step again (the issue's skew: 3/9 of the step for some chunks against
    2/9 for others is gone); with every worker live nothing changes; the loader takes the factors."""
    from risgd_data.loader import make_train_loader

    m = build_manifest(index, 4, 0.5, partition="label_sorted", seed=0)
    assert all(f == 1.0 for fs in chunk_draw_scales(m, set(range(4))).values() for f in fs)

    def drawn(live, scales):
        out = {}
        for w in live:
            for c, f in zip(m["ranks"][w]["chunks"], scales[w]):
                out[c["chunk"]] = out.get(c["chunk"], 0.0) + c["fraction"] * f
        return out

    full = drawn(range(4), chunk_draw_scales(m, set(range(4))))
    plain = drawn({0, 1, 2}, {w: [1.0] * len(m["ranks"][w]["chunks"]) for w in range(3)})
    assert len(set(plain.values())) > 1  # without the factors the chunks are drawn unequally
    scaled = drawn({0, 1, 2}, chunk_draw_scales(m, {0, 1, 2}))
    assert scaled == pytest.approx(full) and len(set(round(v, 9) for v in scaled.values())) == 1
    scales = chunk_draw_scales(m, {0, 1, 2})
    base = make_train_loader(m, digits_dir, 2, base_batch=16, num_workers=0)
    more = make_train_loader(m, digits_dir, 2, base_batch=16, num_workers=0, chunk_scale=scales[2])
    assert more.sub_batch_sizes == [max(1, round(b * f)) for b, f in zip(base.sub_batch_sizes, scales[2])]
    assert more.batch_size > base.batch_size
    with pytest.raises(DataError, match="one factor > 0 per chunk"):
        make_train_loader(m, digits_dir, 2, base_batch=16, num_workers=0, chunk_scale=[1.0])

