"""The package's import rules and safety rules, checked on the source (ast), so a later change
that breaks them fails here rather than in review.

The layout, lowest first: ``adapter.py``, ``errors.py``, ``settings.py``, ``version.py`` (the
base) <- ``model/`` (loading, the walk, h_L) <- ``measure/`` (prompts, generation, judges,
measures) <- ``repair/`` (directions, stages, losses, guard, loop, search, pipeline, report)
<- ``beds/`` (what builds the measurement worlds); ``hub/`` talks to the Hub and ``cli/`` is
the command line over all of it. Arrows run one way, and no two files import each other even
through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "adapter_repair"
FILES = sorted(PKG.rglob("*.py"))
LIBRARY = [p for p in FILES if p.relative_to(PKG).parts[0] not in ("hub", "cli")]
HUB = [p for p in FILES if p.relative_to(PKG).parts[0] == "hub"]
#: what each folder may import from the package, besides itself; "base" is the top-level
#: modules (adapter, errors, settings, version)
MAY_IMPORT = {
    "base": {"base"},
    "model": {"base"},
    "measure": {"base", "model"},
    "repair": {"base", "model", "measure"},
    "beds": {"base", "model", "measure", "repair"},
    "hub": {"base", "model", "measure", "repair"},
    "cli": {"base", "model", "measure", "repair", "beds", "hub"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}


def folder(module: str) -> str:
    """The concern a package module belongs to: its folder, or "base" at the top level."""
    parts = module.split(".")
    if len(parts) > 2 or (MODULES[module].name == "__init__.py" and len(parts) == 2):
        return parts[1]
    return "base"


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from pkg import module`` counts as the module),
    lazy and TYPE_CHECKING imports included: a circle through them is still a circle."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:
                    out.add(sub)
                elif node.module in MODULES:
                    out.add(node.module)
    return out


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


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_each_folder_imports_only_the_folders_below_it(path: Path) -> None:
    """model/ and measure/ import nothing above them; repair/ never imports beds/, hub/ or
    cli/; beds/ uses everything but hub/ and cli/; hub/ never imports beds/ or cli/."""
    me = module_name(path)
    if me == "adapter_repair":
        return  # the public API: lazy names over the whole library
    mine = folder(me)
    bad = {
        m
        for m in package_imports(path)
        if m == "adapter_repair" or (folder(m) != mine and folder(m) not in MAY_IMPORT[mine])
    }
    assert not bad, f"{me} ({mine}/) imports {sorted(bad)}"


def test_no_import_cycles() -> None:
    """No file reaches itself through the files it imports (lazy imports included)."""
    graph = {m: package_imports(p) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_ci_runs_the_readme_commands() -> None:
    root = PKG.parent
    ci = (root / ".ci" / "run").read_text().splitlines()
    readme = (root / "README.md").read_text()
    for marker in ("# README set-up command:", "# README test command:"):
        command = ci[ci.index(marker) + 1].replace(" -q", "")
        assert command in readme, f"{command!r} is in .ci/run but not in README.md"


def test_judges_and_config_agree_on_names() -> None:
    from adapter_repair.measure import config, judges, measures

    assert tuple(judges.REFUSAL_LISTS) == config.REFUSAL_LIST_NAMES
    assert measures.MATCH_RULES == config.MATCH_RULES


def test_help_imports_no_torch() -> None:
    """--help and --version must stay instant: the CLI module imports the library lazily."""
    import subprocess
    import sys

    code = "import sys, adapter_repair.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
