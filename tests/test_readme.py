"""The front door cannot rot: every command line, Python example, file and result line the
README and docs/ name must exist and parse against the code as it is."""
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(lang):
    for page in PAGES:
        for match in re.finditer(rf"```{lang}\n(.*?)```", page.read_text(), re.S):
            yield page.name, match.group(1)


def cli_lines():
    for page, block in blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("chatterbox-accel "):
                    yield page, part


@pytest.mark.parametrize("page,line", list(cli_lines()))
def test_every_cli_line_parses(page, line):
    from chatterbox_accel.cli import build_parser

    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line).replace("...", "")  # optional parts: all given
    argv = [a for a in shlex.split(line)[1:] if a not in ("|",)]
    argv = [a.replace("english|multilingual|turbo", "english") for a in argv]
    args = build_parser().parse_args(argv)
    assert callable(args.run), (page, line)


def test_there_are_cli_lines_for_every_command():
    commands = {line.split()[1] for _, line in cli_lines()}
    assert {"say", "bench", "check", "make-checkpoint", "serve"} <= commands


@pytest.mark.parametrize("page,code", list(blocks("python")))
def test_every_python_example_compiles_and_names_real_things(page, code):
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatterbox"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "chatterbox_accel"):
            assert hasattr(importlib.import_module("chatterbox_accel"), node.attr), f"{page}: chatterbox_accel.{node.attr}"


def test_named_files_exist():
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in set(re.findall(r"(?:scripts|tests|docs|bench/results)/[\w./-]+\.(?:py|sh|md|json|png)", text)):
            if not (ROOT / path).exists() and not any(ROOT.glob(path.replace("*", "?"))):
                missing.append(f"{page.name}: {path}")
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|png))(?:#[\w-]+)?\)", text):
            if not (page.parent / link).exists():
                missing.append(f"{page.name}: link {link}")
        for name in re.findall(r"`([\w.-]+\.json)`", text):
            if "_" in name and not list((ROOT / "bench" / "results").glob(name.replace("...", "*"))):
                missing.append(f"{page.name}: result line {name}")
    assert not missing, missing
