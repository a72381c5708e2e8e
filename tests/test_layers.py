"""The package's layers: models <- core <- {zo, offload} <- train <- cli, read from the source.

A module may import its own package, the layers below it, and only the public modules of another
package (no `zo2_jax.offload._x` from outside `offload`)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "zo2_jax"
BELOW = {  # package -> the zo2_jax packages its modules may import, besides itself
    "models": set(),
    "core": {"models"},
    "zo": {"core", "models"},
    "offload": {"core", "models"},
    "train": {"core", "zo", "offload", "models"},
    "cli": {"core", "zo", "offload", "models", "train"},
    "__init__": {"core", "zo", "offload", "models", "train"},
}


def _imports(path: pathlib.Path):
    """(line, imported module) for every zo2_jax import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "zo2_jax":
                yield node.lineno, name


def _package(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if _package(p) in BELOW)


def test_every_module_is_in_a_layer():
    unknown = sorted({_package(p) for p in PKG.rglob("*.py")} - set(BELOW) - {"data"})
    assert not unknown, f"packages without a layer in BELOW: {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_respect_the_layers(path):
    own = _package(path)
    bad = []
    for line, name in _imports(path):
        parts = name.split(".")
        if len(parts) < 2:
            continue
        other = parts[1]
        if other == own or not (PKG / other).is_dir():
            continue  # its own package, or a name imported from a package's __init__
        if other not in BELOW[own]:
            bad.append(f"line {line}: {name} ({own} may import {sorted(BELOW[own])})")
        elif any(p.startswith("_") for p in parts[2:3]):
            bad.append(f"line {line}: {name} is private to zo2_jax.{other}")
    assert not bad, f"{path.relative_to(PKG.parent)}:\n" + "\n".join(bad)


def test_each_package_imports_first():
    code = """if True:
        import importlib, sys
        for first in ["zo2_jax", "zo2_jax.core.common", "zo2_jax.zo", "zo2_jax.offload",
                      "zo2_jax.train", "zo2_jax.cli"]:
            for name in [m for m in sys.modules if m.startswith("zo2_jax")]:
                del sys.modules[name]
            importlib.import_module(first)
            from zo2_jax import MeZOEngine, Storage, ZO2Engine, mezo_sgd
        """
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)


def test_the_top_level_names_are_the_subpackages_own():
    import zo2_jax
    from zo2_jax import models, offload, train, zo

    for name in zo2_jax.__all__:
        got = getattr(zo2_jax, name)
        owners = [m for m in (models, offload, train, zo) if getattr(m, name, None) is got]
        assert owners or name in ("Int8Leaf", "Storage"), name
    assert zo2_jax.Storage is offload.Storage
    with pytest.raises(AttributeError, match="no attribute 'ZO3Engine'"):
        zo2_jax.ZO3Engine  # noqa: B018


def test_importing_the_package_imports_no_jax():
    code = "import sys, zo2_jax; assert 'jax' not in sys.modules, 'jax imported'; zo2_jax.train"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)
