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
from risgd_data.manifest import build_manifest, check_manifest, load_manifest, rank_chunk_ids, write_manifest
from risgd_data.partition import partition, resolve_chunks

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
    assert r.returncode == 1 and "problem" in r.stdout
    r = _run("build", "--index", ix, "--workers", "4", "--mu", "0.9", "--out", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--mu" in r.stderr and "[0, 0.75]" in r.stderr
