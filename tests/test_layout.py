"""The code's shape rules (issue 23), checked so they hold: no module under soft_ds/ imports the
CLI dispatcher, and no function runs over 80 lines."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "soft_ds"
CLI_IMPORT = re.compile(r"^\s*(from soft_ds\.cli import|from soft_ds import cli\b|import soft_ds\.cli)", re.M)


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_imports_the_cli_dispatcher():
    offenders = [str(p.relative_to(REPO)) for p in modules() if p.name != "cli.py" and CLI_IMPORT.search(p.read_text())]
    assert offenders == []
    assert CLI_IMPORT.search("def f():\n    from soft_ds.cli import COMMANDS\n")  # the pattern finds one


def long_functions(source: str, limit: int = 80) -> list[str]:
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_over_80_lines():
    found = {str(p.relative_to(REPO)): long_functions(p.read_text()) for p in modules()}
    assert {path: names for path, names in found.items() if names} == {}
    assert long_functions("def f():\n" + "    x = 1\n" * 80) == ["f (81 lines)"]  # the count sees one
