"""The house rules on imports, read from the source (ast, nothing imported): the engine never imports
Data or Train; Data never imports the engine or Train; product code never imports the test hosts;
benchmarks never import the tests."""

from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder -> the installed top-level names its files may not import
RULES = {
    "risgd_ext": {"risgd_data", "data", "risgd_recipes", "recipes", "risgd_hosts", "hosts"},
    "data": {"risgd_ext", "risgd_recipes", "recipes", "risgd_hosts", "hosts"},
    "recipes": {"risgd_hosts", "hosts", "tests"},
    "models": {"risgd_hosts", "hosts", "risgd_recipes", "recipes"},
    "risgd_common": {"risgd_ext", "risgd_data", "data", "risgd_recipes", "recipes", "risgd_hosts", "hosts"},
    "benchmarks": {"tests"},
}


def imported_tops(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def violations(rules: dict[str, set[str]]) -> list[str]:
    out = []
    for folder, banned in rules.items():
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
            bad = imported_tops(path) & banned
            if bad:
                out.append(f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}")
    return out


def test_each_part_imports_only_what_it_may():
    assert violations(RULES) == []


def test_the_rule_check_can_fail():
    """Constructed: the trainer does import the data package, and a benchmark the hosts."""
    found = violations({"recipes": {"risgd_data"}, "benchmarks": {"risgd_hosts"}})
    assert any(v.startswith("recipes/train.py imports ['risgd_data']") for v in found)
    assert any(v.startswith("benchmarks/bench_elastic.py imports ['risgd_hosts']") for v in found)
