"""The layering rule of ``common`` (README, Layout), checked on the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "common" / "src" / "common"
SHARED = {"settings", "errors"}
# layer -> the layers (besides settings and errors) its modules may import
ALLOWED: dict[str, set[str]] = {
    "settings": set(),
    "errors": set(),
    "adapters": {"adapters"},
    "domain": {"domain", "adapters"},
    "http": {"http", "domain", "adapters"},
    "ops": {"ops", "domain", "adapters", "platform"},
    "platform": {"platform", "http", "domain", "adapters", "ops"},
}


def _layer(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("common.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_what_its_layer_may(path: Path) -> None:
    relative = path.relative_to(PACKAGE).with_suffix("")
    layer = relative.parts[0]
    allowed = ALLOWED[layer] | SHARED
    wrong = {m for m in _imports(path) if _layer(m) not in allowed}
    assert not wrong, f"{relative} ({layer}) imports {sorted(wrong)}"


def test_every_layer_is_known() -> None:
    layers = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)
