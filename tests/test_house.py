"""The house rules on imports, read from the source (ast, nothing imported): the engine never imports
Data or Train; Data never imports the engine or Train; product code never imports the test hosts;
benchmarks never import the tests. The planner (risgd_planner) sits above the engine, whose codec
registry it reads, and below the trainer: the engine and Data never import it, it imports neither Data
nor Train."""

from __future__ import annotations

import ast
import glob
import os

from helpers import ROOT

# folder -> the installed top-level names its files may not import
HOSTS = {"risgd_hosts", "hosts"}
TRAIN = {"risgd_recipes", "recipes", "risgd_trainer", "trainer", "risgd_tools", "tools"}  # the Train part's rooms
PLANNER = {"risgd_planner"}
RULES = {
    "risgd_ext": {"risgd_data", "data", *TRAIN, *HOSTS, *PLANNER},
    "data": {"risgd_ext", *TRAIN, *HOSTS, *PLANNER},
    "risgd_planner": {"risgd_data", "data", *TRAIN, *HOSTS, "tests"},  # the model and its command: engine-side
    "recipes": {"risgd_trainer", "trainer", "risgd_tools", "tools", *HOSTS, "tests"},  # the recipes and their finder
    "trainer": {"risgd_tools", "tools", *HOSTS, "tests"},  # the trainer never imports the tools around it
    "tools": {*HOSTS, "tests"},
    "models": {*TRAIN, *HOSTS},
    "risgd_common": {"risgd_ext", "risgd_data", "data", *TRAIN, *HOSTS, *PLANNER},
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
    found = violations({"trainer": {"risgd_data"}, "benchmarks": {"risgd_hosts"}})
    assert any(v.startswith("trainer/train.py imports ['risgd_data']") for v in found)
    assert any(v.startswith("benchmarks/bench_elastic.py imports ['risgd_hosts']") for v in found)


def module_graph(package_dir: str, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports at module level (relative or absolute)."""
    graph: dict[str, set[str]] = {}
    for path in glob.glob(os.path.join(ROOT, package_dir, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, package_dir))[:-3].replace(os.sep, ".")
        name = package + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):  # every import: one inside a function to dodge a circle is still one
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from . import x` imports the submodule x (its package is already being imported)
                targets = ([] if node.module is None else [mod]) + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t.startswith(package)}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_paper_package_imports_in_no_circle():
    """Issue 34: the paper package was one import circle of 12 files (grid imported every experiment,
    every experiment imported grid); experiments are now found by registration."""
    graph = module_graph("tools/paper", "risgd_tools.paper")
    assert "risgd_tools.paper.experiments.fig2" in graph and "risgd_tools.paper.registry" in graph
    assert cycles(graph) == []


def test_the_engine_imports_in_no_circle():
    """Issue 45: the compressed all-reduce has its own module, which reduce.py (the choice of strategy)
    imports and which imports nothing of reduce.py."""
    graph = module_graph("risgd_ext", "risgd_ext")
    assert "risgd_ext.twophase" in graph["risgd_ext.reduce"]
    assert cycles(graph) == []


def test_the_planner_has_a_room_of_its_own():
    """Issue 45 item 2: the cost model left the engine for risgd_planner; its model and its command are two
    files, the model importing nothing of the command; the engine imports none of it (RULES), and the rule
    check sees the planner's imports (here the engine's codec registry, which it may read)."""
    graph = module_graph("risgd_planner", "risgd_planner")
    assert "risgd_planner.model" in graph["risgd_planner.cli"] and graph["risgd_planner.model"] == set()
    assert cycles(graph) == []
    assert not os.path.exists(os.path.join(ROOT, "risgd_ext", "cost_model.py"))
    found = violations({"risgd_planner": {"risgd_ext"}})
    assert any(v.startswith("risgd_planner/model.py imports ['risgd_ext']") for v in found), found


def test_the_circle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_every_experiment_file_registers_one_experiment():
    from risgd_tools.paper.registry import builders

    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tools/paper/experiments/*.py"))}
    registered = [m.rsplit(".", 1)[1] for m, _ in builders()]
    assert sorted(registered) == sorted(files - {"__init__"})
    assert registered[:2] == ["fig2", "tau"] and registered[-1] == "workers"  # the report's order
