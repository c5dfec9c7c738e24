"""The module boundaries the design rests on, checked on the source tree (docs/index.md has the picture).

- Only ``plugins/distributed.py`` talks to ``torch.distributed``: everything
  that crosses ranks is in one place, called on the training thread.
- The core (``ckptbus/``) never imports the plugins: imports run one way.
- Trigger sources never import the saving side or the runtime (they only
  publish on the bus); that they import no torch at all is run for real in
  tests/test_custom_source.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from runs import REPO

PLUGINS = REPO / "plugins"
CORE = REPO / "ckptbus"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against the plugins package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    package = ["ckptbus", "plugins", *path.parent.relative_to(PLUGINS).parts] if path.is_relative_to(PLUGINS) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", modules(PLUGINS) + modules(CORE), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_distributed_module_calls_torch_distributed(path: Path) -> None:
    if path == PLUGINS / "distributed.py":
        return
    assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in imported_modules(path))


@pytest.mark.parametrize("path", modules(CORE), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_never_imports_the_plugins(path: Path) -> None:
    assert not any(m.startswith("ckptbus.plugins") for m in imported_modules(path))


@pytest.mark.parametrize("path", modules(PLUGINS / "sources"), ids=lambda p: str(p.relative_to(REPO)))
def test_sources_only_publish(path: Path) -> None:
    forbidden = ("ckptbus.plugins.saving", "ckptbus.plugins.runtime", "ckptbus.plugins.distributed", "torch")
    assert not [m for m in imported_modules(path) if m.startswith(forbidden)]
