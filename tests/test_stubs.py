"""The hand-kept stubs (python/fastq/_fastq.pyi) match the built extension: the same public names,
and for every function and method the same parameter names and defaults."""

import ast
import inspect
from pathlib import Path

import fastq._fastq as ext

STUB = Path(ext.__file__).with_name("_fastq.pyi")


def _stub_defs():
    tree = ast.parse(STUB.read_text())
    funcs, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    return funcs, classes


def _params(node: ast.FunctionDef) -> list[str]:
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return [n for n in names if n not in ("self", "cls")]


def _runtime_params(obj) -> list[str]:
    sig = inspect.signature(obj)
    return [p for p in sig.parameters if p not in ("self", "cls", "$self", "$type")]


def test_every_public_name_has_a_stub():
    funcs, classes = _stub_defs()
    public = {n for n in dir(ext) if not n.startswith("_")}
    assert public == set(funcs) | set(classes)


def test_function_signatures_match():
    funcs, _ = _stub_defs()
    for name, node in funcs.items():
        assert _params(node) == _runtime_params(getattr(ext, name)), name


def test_method_signatures_match():
    _, classes = _stub_defs()
    for cls_name, methods in classes.items():
        cls = getattr(ext, cls_name)
        for name, node in methods.items():
            if name.startswith("__"):
                assert hasattr(cls, name), f"{cls_name}.{name}"
                continue
            attr = getattr(cls, name)
            if isinstance(attr, property) or not callable(attr):
                continue
            assert _params(node) == _runtime_params(attr), f"{cls_name}.{name}"


def test_every_class_attribute_has_a_stub():
    """Properties (result fields, job fields) count too: a field added in Rust needs its stub."""
    _, classes = _stub_defs()
    for cls_name, methods in classes.items():
        cls = getattr(ext, cls_name)
        public = {n for n in dir(cls) if not n.startswith("_")}
        assert public == {n for n in methods if not n.startswith("_")}, cls_name
