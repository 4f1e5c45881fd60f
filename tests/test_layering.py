"""The package's import rules and safety rules, checked on the source (ast), so a later change
that breaks them fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "adapter_repair"
LIBRARY = [p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] not in ("hub", "cli")]
HUB = list((PKG / "hub").rglob("*.py"))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def calls(path: Path, name: str) -> list[int]:
    return [
        n.lineno
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
    ]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_never_imports_the_hub_client_or_the_layers_above(path: Path) -> None:
    bad = {
        m
        for m in imported(path)
        if m.split(".")[0] == "huggingface_hub"
        or m.startswith(("adapter_repair.hub", "adapter_repair.cli"))
    }
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.name)
def test_hub_never_imports_the_cli(path: Path) -> None:
    assert not {m for m in imported(path) if m.startswith("adapter_repair.cli")}


@pytest.mark.parametrize("path", LIBRARY + HUB, ids=lambda p: p.name)
def test_library_never_prints(path: Path) -> None:
    assert calls(path, "print") == []


@pytest.mark.parametrize("path", list(PKG.rglob("*.py")), ids=lambda p: p.name)
def test_no_remote_code_and_no_pickle(path: Path) -> None:
    text = path.read_text()
    assert "trust_remote_code=True" not in text
    assert "torch.load(" not in text and "pickle" not in imported(path)


def test_ci_runs_the_readme_commands() -> None:
    root = PKG.parent
    ci = (root / ".ci" / "run").read_text().splitlines()
    readme = (root / "README.md").read_text()
    for marker in ("# README set-up command:", "# README test command:"):
        command = ci[ci.index(marker) + 1].replace(" -q", "")
        assert command in readme, f"{command!r} is in .ci/run but not in README.md"


def test_judges_and_config_agree_on_names() -> None:
    from adapter_repair import config, judges, measures

    assert tuple(judges.REFUSAL_LISTS) == config.REFUSAL_LIST_NAMES
    assert measures.MATCH_RULES == config.MATCH_RULES


def test_help_imports_no_torch() -> None:
    """--help and --version must stay instant: the CLI module imports the library lazily."""
    import subprocess
    import sys

    code = "import sys, adapter_repair.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
