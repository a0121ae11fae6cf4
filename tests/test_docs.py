"""The docs are true to the code: the MkDocs site builds with --strict (a broken link, a missing
anchor or a page left out of the navigation fails), and every command line in the docs' code blocks
names a command, subcommand and flags that exist, and recipe keys that exist, checked against the
commands' own argparse parsers (captured at parse time, nothing run) and the recipe schema."""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]

# installed command -> the module whose main() it runs (pyproject's [project.scripts])
SCRIPTS = {
    "risgd-train": "risgd_trainer.train", "risgd-make-shards": "risgd_data.make_shards",
    "risgd-manifest": "risgd_data.manifest", "risgd-replicate": "risgd_data.replicate",
    "risgd-cost-model": "risgd_planner.cli", "risgd-compare": "risgd_tools.compare",
    "risgd-demo": "risgd_tools.demo", "risgd-paper": "risgd_tools.paper", "risgd-elastic": None,
    "risgd-netns-cluster": "risgd_hosts.netns_cluster",
}
TRAINER = "risgd_trainer.train"


def test_the_scripts_table_is_pyprojects():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)
    for name, module in SCRIPTS.items():
        assert module is None or scripts[name].split(":")[0] == module, name


def test_the_docs_site_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "site" / "index.html")


def code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, command) of the shell lines in a page's untyped or shell code blocks, with
    continuation lines joined and ``$ `` prompts dropped."""
    out, in_code, shell, pending, start = [], False, False, "", 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            stripped = line.rstrip("\n")
            if stripped.lstrip().startswith("```"):
                lang = stripped.lstrip()[3:].strip()
                in_code, shell = (not in_code), lang in ("", "bash", "sh", "shell", "console")
                continue
            if not (in_code and shell):
                continue
            text = stripped.strip()
            if text.startswith("$ "):
                text = text[2:]
            if not pending:
                start = n
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            out.append((start, pending + text))
            pending = ""
    return out


def inline_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of the inline code spans outside code blocks (a span may wrap lines)."""
    with open(path) as f:
        text = f.read()
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
            for m in re.finditer(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, flags=re.S)]


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def capture_parser(run, monkeypatch) -> argparse.ArgumentParser:
    """The first argparse parser that ``run()`` asks to parse arguments (nothing after that runs)."""
    def parse(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse)
    try:
        run()
    except _Parsed as p:
        return p.parser
    finally:
        monkeypatch.undo()
    raise AssertionError("the command parsed no arguments")


class _Refused(Exception):
    pass


def loosen(parser: argparse.ArgumentParser) -> None:
    """The parser with its types, choices and required flags relaxed (the docs write placeholders such
    as N or DIR), its subcommands kept, and its errors raised instead of exiting."""
    def error(message):
        raise _Refused(message)

    parser.error = error
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                loosen(sub)
        else:
            a.type, a.required = None, False
            if not isinstance(a, argparse._SubParsersAction):
                a.choices = None


def recipe_keys() -> set[str]:
    from risgd_trainer.run_config import SCHEMA

    keys = set()
    for k, v in SCHEMA.items():
        keys.add(k)
        if isinstance(v, dict):
            keys |= {f"{k}.{sub}" for sub in v}
    return keys


def _module_runner(module: str):
    def run():
        mod = importlib.import_module(module)
        if hasattr(mod, "main"):
            mod.main([])
        else:
            runpy.run_module(module, run_name="__main__")
    return run


def _script_runner(path: str):
    def run():  # as `python path` runs it: its folder first on the path
        sys.path.insert(0, os.path.dirname(path))
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            sys.path.remove(os.path.dirname(path))
    return run


def resolve(tokens: list[str]) -> tuple[str, object, list[str]] | None:
    """(what, how to get its parser, its arguments) for a project command line, None for others
    (pip, git, wandb, cat, ...)."""
    while tokens and (tokens[0] in ("sudo", "time", "env") or re.match(r"^[A-Z_]+=", tokens[0])):
        tokens = tokens[1:]
    if not tokens:
        return None
    cmd, rest = tokens[0], tokens[1:]
    if cmd in SCRIPTS:
        if cmd == "risgd-elastic":  # torchrun's options, then the trainer's after --
            return ("risgd-elastic", _module_runner(TRAINER), rest[rest.index("--") + 1:]) if "--" in rest else None
        return cmd, _module_runner(SCRIPTS[cmd]), rest
    if os.path.basename(cmd).startswith("python"):
        if rest[:1] == ["-m"] and len(rest) > 1:
            if rest[1].isupper() or importlib.util.find_spec(rest[1].split(".")[0]) is None:
                return None  # a placeholder (python -m MODULE), or another project's module (pip, venv)
            return f"python -m {rest[1]}", _module_runner(rest[1]), rest[2:]
        if rest and rest[0].endswith(".py"):
            path = os.path.join(ROOT, rest[0])
            if rest[0] == "train.py":
                return "train.py", _module_runner(TRAINER), rest[1:]
            if os.path.exists(path):
                return rest[0], _script_runner(path), rest[1:]
            return rest[0], None, rest[1:]  # a script that does not exist
        return None
    if cmd == "deepspeed":
        if "--module" in rest:
            i = rest.index("--module")
            return f"deepspeed --module {rest[i + 1]}", _module_runner(rest[i + 1]), rest[i + 2:]
        script = next((i for i, t in enumerate(rest) if t.endswith(".py")), None)
        if script is None:
            return None
        path = os.path.join(ROOT, rest[script])
        runner = (_module_runner(TRAINER) if rest[script] == "train.py"
                  else _script_runner(path) if os.path.exists(path) else None)
        return f"deepspeed {rest[script]}", runner, rest[script + 1:]
    if cmd == "make":
        return "make", None, rest
    return None


def _make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", f.read(), re.M)}


def problems_of(line: str, monkeypatch) -> list[str]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    unbracketed, optional = [], False  # [--optional] and [--optional VALUE] as written in usage lines
    for t in tokens:
        if t.startswith("[-"):
            t, optional = t[1:], True
        if optional and t.endswith("]"):
            t, optional = t[:-1], False
        unbracketed.append(t)
    tokens = unbracketed
    for sep in ("&&", "||", ";", "|"):  # the first command of a pipeline or a list
        if sep in tokens:
            tokens = tokens[:tokens.index(sep)]
    found = resolve(tokens)
    if found is None:
        return []
    what, runner, args = found
    if what == "make":
        targets = _make_targets()
        return [f"make {t}: no such target" for t in args if not t.startswith("-") and "=" not in t
                and t not in targets]
    if runner is None:
        return [f"{what}: no such command or script"]
    parser = capture_parser(runner, monkeypatch)
    loosen(parser)
    out = []
    args = [a for a in args if a not in ("-h", "--help") and not a.endswith("...")]
    try:
        _, unknown = parser.parse_known_args(args)
    except _Refused as e:
        # a command named without all its arguments (`risgd-paper --recipe` in prose) is not wrong
        if "are required" in str(e) or ("expected" in str(e) and args and args[-1].startswith("-")):
            return []
        return [f"{what}: {e}"]
    if unknown:
        out.append(f"{what}: unrecognized {' '.join(unknown)}")
    if what in ("train.py", "risgd-train", "risgd-elastic", "deepspeed train.py") or TRAINER in what:
        keys = recipe_keys()
        for a in args:
            if "=" in a and not a.startswith("-") and re.match(r"^[a-z_][\w.]*=", a):
                key = a.split("=", 1)[0]
                if key not in keys:
                    out.append(f"{what}: no recipe key {key}")
    return out


def test_every_command_line_in_the_docs_names_what_exists(monkeypatch):
    found, checked = [], 0
    for page in PAGES:
        for n, line in code_lines(page) + inline_lines(page):
            problems = problems_of(line, monkeypatch)
            checked += 1
            found += [f"{os.path.relpath(page, ROOT)}:{n}: {p}    ({line.strip()[:100]})" for p in problems]
    assert checked > 50  # the docs' command lines were read
    assert not found, "\n".join(found)


def test_the_check_finds_a_wrong_flag_a_subcommand_and_a_key(monkeypatch):
    """The check can fail: command lines with a made-up flag, subcommand and recipe key are reported."""
    assert problems_of("risgd-cost-model advise --nodes 8", monkeypatch) == ["risgd-cost-model: unrecognized advise"]
    assert problems_of("python -m risgd_ext.cost_model --nodes 8 --no-such-flag 1", monkeypatch) == [
        "python -m risgd_ext.cost_model: unrecognized --no-such-flag 1"]
    (bad,) = problems_of("python -m data.manifest bild --index x", monkeypatch)
    assert bad.startswith("python -m data.manifest: argument ") and "invalid choice: 'bild'" in bad
    assert problems_of("deepspeed --num_gpus 4 train.py --recipe recipes/digits.yaml tua=50", monkeypatch) == [
        "deepspeed train.py: no recipe key tua"]
    assert problems_of("python benchmarks/round_probe.py --modle resnet20_cifar", monkeypatch) == [
        "benchmarks/round_probe.py: unrecognized --modle resnet20_cifar"]
    assert problems_of("make tset", monkeypatch) == ["make tset: no such target"]
    assert problems_of("python benchmarks/nosuch.py", monkeypatch) == [
        "benchmarks/nosuch.py: no such command or script"]
    assert problems_of("pip install risgd", monkeypatch) == []


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_each_page_has_command_lines_or_is_prose(page):
    code_lines(page)  # every page parses (unbalanced fences would swallow the rest)
    with open(page) as f:
        assert f.read().count("```") % 2 == 0, page


PAGE_BYTES = 20_000  # a page a reader can finish: one topic a page, each fact on one page and linked from the others


def test_every_page_is_under_20_kb():
    sizes = {os.path.relpath(p, ROOT): os.path.getsize(p) for p in PAGES}
    assert len(sizes) > 10 and all(sizes.values())  # the pages were found and read
    over = {p: n for p, n in sizes.items() if n >= PAGE_BYTES}
    assert not over, f"pages of {PAGE_BYTES} bytes or more (split them by topic and link): {over}"
