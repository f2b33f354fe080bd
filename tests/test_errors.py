"""Every core error variant lands in its fastq exception class, with the file and tensor it names; the
binding resolves the classes when it is imported (a missing class fails the import, not a user's run)."""

import subprocess
import sys
from pathlib import Path

import fastq
import fastq.errors
import pytest
from fastq import _fastq

# The table users rely on (README: errors); written out here, apart from the Rust one it checks.
EXPECTED = {
    "NotFound": ("MissingFileError", FileNotFoundError),
    "MissingShard": ("MissingFileError", FileNotFoundError),
    "Io": ("FastqIOError", OSError),
    "InvalidHeader": ("HeaderError", ValueError),
    "SizeMismatch": ("HeaderError", ValueError),
    "Overlap": ("HeaderError", ValueError),
    "IndexMismatch": ("HeaderError", ValueError),
    "DuplicateTensor": ("HeaderError", ValueError),
    "ShardTruncated": ("TruncatedShardError", ValueError),
    "UnknownTensor": ("UnknownTensorError", KeyError),
    "UnsupportedDtype": ("UnsupportedDtypeError", TypeError),
    "UnknownDtype": ("UnsupportedDtypeError", TypeError),
    "NonFinite": ("NonFiniteError", ValueError),
    "BadShape": ("ShapeError", ValueError),
    "BadRange": ("ShapeError", ValueError),
    "InvalidArgument": ("InvalidArgumentError", ValueError),
    "Cancelled": ("CancelledError", Exception),
    "Device": ("DeviceError", RuntimeError),
    "Internal": ("InternalError", RuntimeError),
}
# Variants whose message has no file or no tensor.
NO_PATH = {"UnknownDtype", "InvalidArgument", "Cancelled", "Device", "Internal"}
NO_TENSOR = NO_PATH | {"NotFound", "Io"}
TENSOR = "model.layers.0.mlp.up_proj.weight"


def test_every_core_variant_maps_to_its_class():
    samples = _fastq.error_samples()
    assert {v for v, _ in samples} == set(EXPECTED), "a core variant without an expected class"
    for variant, exc in samples:
        cls_name, builtin = EXPECTED[variant]
        assert type(exc).__name__ == cls_name, variant
        assert isinstance(exc, fastq.FastqError) and isinstance(exc, builtin), variant
        assert type(exc) is getattr(fastq, cls_name), variant
        if variant in NO_PATH:
            assert exc.path is None, variant
        else:
            assert exc.path and exc.path.endswith(".safetensors") and exc.path in str(exc), variant
        if variant in NO_TENSOR:
            assert exc.tensor is None, variant
        else:
            assert exc.tensor in (TENSOR, "b") and exc.tensor in str(exc), variant


def test_every_exception_class_is_exported_and_a_fastq_error():
    for name in fastq.errors.__all__:
        cls = getattr(fastq.errors, name)
        assert getattr(fastq, name) is cls and name in fastq.__all__, name
        assert issubclass(cls, fastq.FastqError), name
    defined = {n for n, v in vars(fastq.errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert defined == set(fastq.errors.__all__)


@pytest.mark.parametrize("name", fastq.errors.__all__)
def test_python_raised_errors_carry_path_and_tensor(name):
    """Python-side sites raise ``Cls(message, path=..., tensor=...)``: the attributes are set (a path-like
    becomes a str), the message stays the whole ``str()`` (an OSError or KeyError base would rewrite it),
    and an error made without them has neither."""
    cls = getattr(fastq.errors, name)
    e = cls("/m/a.safetensors: tensor 'w': bad", path=Path("/m/a.safetensors"), tensor="w")
    assert (e.path, e.tensor, str(e)) == ("/m/a.safetensors", "w", "/m/a.safetensors: tensor 'w': bad")
    bare = cls("bad")
    assert (bare.path, bare.tensor, str(bare)) == (None, None, "bad")


def test_a_missing_class_fails_the_import():
    """The extension's init looks every class up: with one deleted, `import fastq._fastq` raises."""
    pkg = Path(fastq.__file__).parent
    code = f"""
import importlib.util, sys, types
pkg = types.ModuleType("fastq"); pkg.__path__ = [{str(pkg)!r}]; sys.modules["fastq"] = pkg
import fastq.errors
del fastq.errors.InternalError
try:
    import fastq._fastq
except AttributeError as e:
    print("refused:", e)
else:
    print("imported")
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:") and "InternalError" in out.stdout, out.stdout


def test_binding_raises_no_bare_python_exceptions():
    """Every binding error goes through a core variant (errors.rs); only the buffer protocol's own
    BufferError stays, as that protocol requires."""
    src = Path(__file__).parents[1] / "rust" / "py" / "src"
    for path in src.glob("*.rs"):
        text = path.read_text()
        for bare in ("PyValueError", "PyRuntimeError", "PyTypeError", "PyKeyError", "PyOSError"):
            assert bare not in text, f"{path.name} raises {bare}"


@pytest.mark.parametrize(
    "call, cls",
    [
        (lambda: _fastq.Job.four_bit("w", blocksize=7), fastq.InvalidArgumentError),
        (lambda: _fastq.Job.four_bit("w", quant_type="nf5"), fastq.InvalidArgumentError),
        (lambda: _fastq.Job.four_bit("w", cast="I8"), fastq.UnsupportedDtypeError),
        (lambda: _fastq.Job.four_bit("w", storage="F7"), fastq.UnsupportedDtypeError),
        (lambda: _fastq.Job.int8("w", cast="float7"), fastq.UnsupportedDtypeError),
        (lambda: _fastq.Output.part("w", 0, "scales"), fastq.InvalidArgumentError),
        (lambda: _fastq.Output.copy("w", "w", cast="U8"), fastq.UnsupportedDtypeError),
        (lambda: _fastq.quantize_4bit(b"\0" * 8, "I32", [2]), fastq.UnsupportedDtypeError),
        (lambda: _fastq.quantize_int8(b"\0" * 8, "F32", [3]), fastq.ShapeError),
    ],
)
def test_binding_arguments_raise_typed_errors(call, cls):
    with pytest.raises(cls):
        call()
