"""README.md and docs/ say only what is true of the repository: every `make` target they name exists,
every flag they pass to a script is one the script defines, and every repository path they name is
there. Code only (spans and fenced blocks), where a reader copies from."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest

from scripts.common import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("handlers/", "models/", "k8s/", "scripts/", "tests/", "bench/", "docs/", "data/", ".ci/")
MADE = ("scripts/grpc_gen", "k8s/wheelhouse")  # made by `make protos` and `make image`, not committed


def code(text: str) -> list[str]:
    """The fenced blocks' lines and the inline code spans of a markdown text."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append(line.split("  #")[0])  # a trailing comment is prose
        else:
            out += re.findall(r"`([^`]+)`", line)
    return out


def make_targets() -> dict[str, str]:
    """Each Makefile target and its recipe."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+):(?!=)", line):
            current = m.group(1)
            targets[current] = ""
        elif line.startswith("\t") and current:
            targets[current] += line + "\n"
        elif line and not line.startswith(("\t", "#")):
            current = None
    return targets


def flags_defined(sources: list[str]) -> set[str]:
    """The --flags the scripts' argument parsers (Python) or option cases (shell) define."""
    found = set()
    for source in sources:
        text = (ROOT / source).read_text()
        found |= set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", text))  # argparse
        found |= set(re.findall(r"^\s*(--[a-z][a-z0-9-]*)\)", text, re.M))  # case "$1" in --flag)
        found |= set(re.findall(r"\|\s*(--[a-z][a-z0-9-]*)\)", text))
    return found


def script_sources(command: str) -> list[str]:
    """The files that define a command's flags: scripts/X.py for `-m scripts.X`, a shell script's file."""
    files = [f"scripts/{m}.py" for m in re.findall(r"-m scripts[. ]([a-z_]+)", command)]
    files += re.findall(r"(?:^|bash )(k8s/\S+\.sh)", command)
    return files


def commands() -> list[tuple[str, str]]:
    """(document, command) for every make or script command README and docs/ show."""
    found = []
    for doc in DOCS:
        for span in code(doc.read_text()):
            for part in re.split(r"&&|;|\|\|", span):
                part = part.strip()
                if re.match(r"(make |(\.venv/bin/)?python -m scripts|(bash )?k8s/\S+\.sh)", part):
                    found.append((doc.name, part))
    return found


def test_the_docs_show_commands():
    assert len(commands()) > 40  # the parser below still finds them


@pytest.mark.parametrize("doc,command", commands())
def test_every_make_target_and_script_flag_the_docs_show_exists(doc, command):
    targets = make_targets()
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    if words[0] == "make":
        named = [w for w in words[1:] if not w.startswith("-") and "=" not in w and w != "..."]
        assert named, f"{doc}: `{command}` names no target"
        for target in named:
            assert target in targets, f"{doc}: `{command}`: no make target {target!r}"
        args = next((w.split("=", 1)[1] for w in words if w.startswith("ARGS=")), "")
        sources = [s for t in named for s in script_sources(targets[t])]
        flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args)
    else:
        sources = script_sources(command)
        flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command)
    if flags:
        assert sources, f"{doc}: `{command}` passes {flags} to no script"
        unknown = set(flags) - flags_defined(sources) - {"--help"}
        assert not unknown, f"{doc}: `{command}`: {sorted(unknown)} defined in none of {sources}"


def repo_paths() -> list[tuple[str, str]]:
    """(document, path) for each repository path README and docs/ name in code or as a link."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        candidates = [w for span in code(text) for w in re.split(r"[\s,()=\"']+", span)]
        links = [
            (doc.parent / target).resolve().relative_to(ROOT).as_posix()
            for target in re.findall(r"\]\(([^)#\s]+)", text)
            if "://" not in target
        ]
        for word in [*candidates, *links]:
            word = word.rstrip(".:;`").split(":")[0]
            if word.startswith(TOP) and not word.startswith(MADE) and not re.search(r"[*<>{}$…]|\.\.\.", word):
                found.append((doc.name, word))
    return sorted(set(found))


def test_the_docs_name_paths():
    assert len(repo_paths()) > 50


@pytest.mark.parametrize("doc,path", repo_paths())
def test_every_repository_path_the_docs_name_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"


# ----------------------------------------------------------------------------- figures

NUMBER = re.compile(r"(?<![\w.-])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?(?![\w])")
SCALES = (1, 1000, 1e-3, 100, 1e-6, 1 / 60)  # as recorded, ms <-> s, a ratio in %, bytes in MB, s in min


def tables() -> list[tuple[str, int, str, str]]:
    """(document, line, the table's rows, the text around it) for every markdown table."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].lstrip().startswith("|"):
                j = i
                while j < len(lines) and lines[j].lstrip().startswith("|"):
                    j += 1
                rows = "\n".join(lines[i + 2 : j])  # the header and its rule name no figures
                found.append((doc.name, i + 1, rows, "\n".join(lines[max(0, i - 8) : j + 3])))
                i = j
            i += 1
    return found


def figures(rows: str) -> list[str]:
    """The numbers a table quotes: not in code spans, not versions."""
    text = re.sub(r"`[^`]*`", "", rows)
    text = re.sub(r"\bv?\d+\.\d+\.\d+\b", "", text)
    return [n.rstrip(",") for n in NUMBER.findall(text)]


def recorded(context: str) -> list[Path]:
    """The results files a table names around it (a folder stands for its files)."""
    paths = []
    for name in re.findall(r"bench/results/[^\s`'\")\]]*", context):
        name = name.rstrip(".,;:")
        if re.search(r"[*<>{}]", name):  # a pattern, not a file
            continue
        path = ROOT / name
        paths += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return paths


def found(figure: str, numbers: set[float]) -> bool:
    value = float(figure.replace(",", ""))
    decimals = len(figure.split(".")[1]) if "." in figure and "e" not in figure else None
    for n in numbers:
        for scale in SCALES:
            x = n * scale
            if (decimals is None and "e" in figure and math.isclose(x, value, rel_tol=0.05)) or (
                decimals is not None and round(x, decimals) == value
            ):
                return True
            if decimals is None and "e" not in figure and round(x) == value:
                return True
    return False


FIGURE_TABLES = [t for t in tables() if figures(t[2])]  # a table of words names no file


def test_the_docs_have_tables_of_figures():
    assert len(FIGURE_TABLES) >= 8


@pytest.mark.parametrize("doc,line,rows,context", FIGURE_TABLES, ids=[f"{t[0]}:{t[1]}" for t in FIGURE_TABLES])
def test_every_figure_in_a_table_is_in_the_results_file_it_names(doc, line, rows, context):
    quoted = figures(rows)
    files = recorded(context)
    assert files, f"{doc}:{line}: a table of figures that names no bench/results file"
    missing = [str(f.relative_to(ROOT)) for f in files if not f.is_file()]
    assert not missing, f"{doc}:{line}: names {missing}, which do not exist"
    numbers = {float(n.replace(",", "")) for f in files for n in NUMBER.findall(f.read_text(errors="replace"))}
    absent = [q for q in quoted if not found(q, numbers)]
    assert not absent, f"{doc}:{line}: {absent} are in none of {[str(f.relative_to(ROOT)) for f in files]}"
