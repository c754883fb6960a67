"""The layers stay true: the method (`core/`) knows no command line and writes no files; the file formats
(`files/`) know neither the method nor the tool on top. Read from the source, every import at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seedselect_cli"
LEAVES = {"seedselect_cli.errors", "seedselect_cli.limits", "seedselect_cli.derive", "seedselect_cli.shell"}  # import nothing of the package: any layer may use them


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as absolute dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def forbidden(imported: str, prefixes: tuple[str, ...]) -> bool:
    return any(imported == p or imported.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules_under("core"), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_imports_no_config_no_hydra_and_no_files(path):
    bad = sorted(m for m in imports_of(path)
                 if forbidden(m, ("hydra", "omegaconf", "seedselect_cli.files", "seedselect_cli.config"))
                 or (m.startswith("seedselect_cli.") and not m.startswith("seedselect_cli.core")
                     and not any(m == leaf or m.startswith(leaf + ".") for leaf in LEAVES)))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", modules_under("files"), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_files_import_neither_the_method_nor_the_tool(path):
    bad = sorted(m for m in imports_of(path)
                 if m.startswith("seedselect_cli.") and not m.startswith("seedselect_cli.files")
                 and not any(m == leaf or m.startswith(leaf + ".") for leaf in LEAVES))
    assert not bad, f"{path.name} imports {bad}"


def test_the_leaves_import_nothing_of_the_package():
    for leaf in LEAVES:
        path = PACKAGE / f"{leaf.removeprefix('seedselect_cli.')}.py"
        assert not {m for m in imports_of(path) if m.startswith("seedselect_cli")}, leaf


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The check itself: a module that imports the config, inside a function, is caught."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from seedselect_cli.config import Config\n    import omegaconf\n")
    found = imports_of(planted)
    assert forbidden("seedselect_cli.config.Config", ("seedselect_cli.config",)) and "omegaconf" in found
    assert "seedselect_cli.config" in found
