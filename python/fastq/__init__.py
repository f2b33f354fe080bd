"""fastq: a Rust-accelerated loader for 4-bit and 8-bit (bitsandbytes) quantized PyTorch models.

    import fastq
    model = fastq.load("path/to/model", fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "auto")

``import fastq`` is cheap: the exceptions and the version are here at once, every other name is imported
on first use (PEP 562), so the ``fastq`` command starts without torch, transformers or bitsandbytes
and pays for them only in the commands that need them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._fastq import __version__
from .errors import (
    CancelledError,
    ConfigError,
    ConfigFileError,
    ConversionLockedError,
    DeviceError,
    FastqError,
    FastqIOError,
    HeaderError,
    InternalError,
    InvalidArgumentError,
    MissingFileError,
    NonFiniteError,
    OutputExistsError,
    PartialShareError,
    QuantStateError,
    ShapeError,
    TruncatedShardError,
    UnknownTensorError,
    UnsavableModelError,
    UnsupportedDtypeError,
)
from .logs import quiet_bitsandbytes as _quiet_bitsandbytes

# Before any part of fastq imports bitsandbytes (whose import logs the warning logs.py drops): a load,
# a conversion, the CLI and fastq.ops alike.
_quiet_bitsandbytes()

if TYPE_CHECKING:
    from . import ops
    from .checkpoint import SPEC_INT8, Checkpoint, Spec4bit, TensorMeta, open
    from .config import QuantConfig
    from .convert import convert
    from .loader import load, load_and_quantize_model
    from .save import save
    from .shard import ShareStats

__all__ = [
    "SPEC_INT8",
    "CancelledError",
    "Checkpoint",
    "ConfigError",
    "ConfigFileError",
    "ConversionLockedError",
    "DeviceError",
    "FastqError",
    "FastqIOError",
    "HeaderError",
    "InternalError",
    "InvalidArgumentError",
    "MissingFileError",
    "NonFiniteError",
    "OutputExistsError",
    "PartialShareError",
    "QuantConfig",
    "QuantStateError",
    "ShapeError",
    "ShareStats",
    "Spec4bit",
    "TensorMeta",
    "TruncatedShardError",
    "UnknownTensorError",
    "UnsavableModelError",
    "UnsupportedDtypeError",
    "__version__",
    "convert",
    "load",
    "load_and_quantize_model",
    "open",
    "ops",
    "save",
]

#: name -> the submodule that defines it (``ops`` is the submodule itself).
_LAZY = {
    "SPEC_INT8": "checkpoint",
    "Checkpoint": "checkpoint",
    "Spec4bit": "checkpoint",
    "TensorMeta": "checkpoint",
    "open": "checkpoint",
    "QuantConfig": "config",
    "ShareStats": "shard",
    "convert": "convert",
    "load": "loader",
    "load_and_quantize_model": "loader",
    "save": "save",
    "ops": "ops",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastq' has no attribute {name!r}")
    sub = importlib.import_module(f"{__name__}.{module}")
    value = sub if name == "ops" else getattr(sub, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``fastq.convert`` and ``fastq.save`` are functions, though submodules of the same names exist:
    importing the submodule (``from fastq.convert import parse_size``) makes the import system set the
    package's attribute to the module, which the eager imports used to overwrite with the function. This
    keeps the function there."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("convert", "save") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
