"""Imports run one way: the launchers (kernels/, vlmfast/native/) and the helpers they share
(vlmfast/runtime/) never import the op layer (vlmfast.ops), which imports them. A launcher that
did would make a cycle (native/patch_embed.py <-> ops/patch_embed.py was one)."""

import ast
import importlib.util
import pathlib

import pytest

LOWER_LAYERS = ("vlmfast.kernels", "vlmfast.native", "vlmfast.runtime")


def _package_files(package: str) -> list[pathlib.Path]:
    spec = importlib.util.find_spec(package)
    (folder,) = spec.submodule_search_locations
    return sorted(pathlib.Path(folder).glob("*.py"))


def _imported_modules(path: pathlib.Path, package: str) -> set[str]:
    """Every module `path` imports, at the top or inside a function, relative imports resolved;
    `from a import b` counts as a.b as well (b may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_op_layer(module: str) -> bool:
    return module == "vlmfast.ops" or module.startswith("vlmfast.ops.")


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_lower_layers_never_import_the_op_layer(package):
    files = _package_files(package)
    assert files, f"{package}: no modules found"
    offenders = {
        f"{path.name}: {module}"
        for path in files
        for module in _imported_modules(path, package)
        if _is_op_layer(module)
    }
    assert not offenders, f"{package} imports the op layer: {sorted(offenders)}"


def test_runtime_imports_nothing_of_vlmfast_but_leaves():
    """vlmfast.runtime is a leaf: torch and the standard library, the extension loader, itself."""
    allowed = ("vlmfast.runtime", "vlmfast._extension")
    for path in _package_files("vlmfast.runtime"):
        for module in _imported_modules(path, "vlmfast.runtime"):
            if module.startswith("vlmfast"):
                assert module.startswith(allowed) or module == "vlmfast", f"{path.name} imports {module}"


def test_the_check_sees_an_op_layer_import(tmp_path):
    """The parser above catches each way of spelling the import (so the test can fail)."""
    sources = ["from vlmfast.ops import _alloc", "import vlmfast.ops.rotary", "from vlmfast import ops",
               "def f():\n    from ..ops import reference"]
    for i, source in enumerate(sources):
        path = tmp_path / f"m{i}.py"
        path.write_text(source + "\n")
        assert any(_is_op_layer(m) for m in _imported_modules(path, "vlmfast.native")), source
