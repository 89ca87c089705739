"""The library's shape: imports point down the layers of DESIGN.md, no module imports another's private
names, and imports sit at the top of modules unless a comment says why one is deferred."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qlab"
MODULES = sorted(p for p in ROOT.rglob("*.py"))

#: package (or module) -> qlab packages it must not import (DESIGN.md: imports point down only)
FORBIDDEN = {
    "numerics": {"nn", "ptq", "experiments", "models", "data", "train", "evaluate", "plot", "cli", "export",
                 "analysis"},
    "models": {"nn", "ptq", "experiments", "plot", "cli", "export", "analysis"},
    "data": {"nn", "ptq", "experiments", "models", "plot", "cli", "export", "analysis"},
    "train": {"nn", "ptq", "experiments", "plot", "cli", "export", "analysis"},
    "distributed": {"nn", "ptq", "experiments", "models", "data", "train", "evaluate", "plot", "cli", "export",
                    "analysis"},
    "evaluate": {"nn", "ptq", "experiments", "plot", "cli", "export", "analysis"},
    "nn": {"ptq", "experiments", "plot", "cli", "export", "analysis"},
    "ptq": {"experiments", "plot", "cli", "export", "analysis"},
    "export": {"analysis", "experiments", "plot", "cli"},
    "analysis": {"experiments", "plot", "cli"},
    "experiments": {"plot", "cli"},
}


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name, []


def _qlab_target(path, node, module) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.level:
        base = list(path.relative_to(ROOT.parent).with_suffix("").parts)[: -node.level]
        module = ".".join(base + ([module] if module else []))
    return module if module == "qlab" or module.startswith("qlab.") else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_names_are_public(path):
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    top = {id(n) for n in tree.body}
    layer = _layer(path)
    aliases = set()
    for node, module, names in _imports(tree):
        target = _qlab_target(path, node, module)
        if target is None:
            continue
        parts = target.split(".")
        if len(parts) > 1:
            assert parts[1] not in FORBIDDEN.get(layer, set()), f"{path.name}: {layer} must not import {target}"
        for n in names:
            assert not n.startswith("_") or n.startswith("__"), f"{path.name} imports the private name {target}.{n}"
            if len(parts) > 1 and n not in ("*",):
                aliases.add(n)
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                aliases.add(a.asname or a.name)
        if id(node) not in top and not isinstance(node, ast.ImportFrom) or (id(node) not in top and node.level == 0
                                                                             and target != "qlab"):
            context = " ".join(lines[max(0, node.lineno - 3):node.lineno])
            assert "noqa: PLC0415" in context or "#" in lines[node.lineno - 1], (
                f"{path.name}:{node.lineno}: import of {target} inside a function without a comment saying why")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert not node.attr.startswith("_") or node.attr.startswith("__"), (
                f"{path.name}:{node.lineno}: {node.value.id}.{node.attr} reaches into another module's private name")
