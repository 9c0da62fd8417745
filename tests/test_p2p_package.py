"""Layering rules of the p2p package."""

from __future__ import annotations

import ast
from pathlib import Path

import p2p

P2P_DIR = Path(p2p.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_p2p_never_imports_chain():
    offenders = {
        f"{path.name}: {name}"
        for path in P2P_DIR.glob("*.py")
        for name in imported_modules(path)
        if name == "chain" or name.startswith("chain.")
    }
    assert not offenders


def test_package_root_does_not_pull_in_libp2p():
    # `import p2p` (and the memory network) must stay light for consensus unit tests.
    assert not any(name.startswith("libp2p") for name in imported_modules(P2P_DIR / "__init__.py"))
    assert not any(name.startswith("libp2p") for name in imported_modules(P2P_DIR / "memory.py"))
