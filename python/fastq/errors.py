"""fastq's exceptions, every one of them (``fastq`` re-exports each). Every error the Rust core raises
lands in one of these (the binding resolves its table, rust/py/src/errors.rs, when it is imported);
each carries ``path`` (the file) and ``tensor`` (the tensor name) where the error has them."""

from __future__ import annotations

import os

__all__ = [
    "CancelledError",
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
    "QuantStateError",
    "ShapeError",
    "TruncatedShardError",
    "UnknownTensorError",
    "UnsavableModelError",
    "UnsupportedDtypeError",
]


class FastqError(Exception):
    """Base class of every fastq error: ``FastqError(message, path=..., tensor=...)``."""

    path: str | None = None
    tensor: str | None = None

    def __init__(self, *args, path: str | os.PathLike | None = None, tensor: str | None = None):
        super().__init__(*args)
        if path is not None:
            self.path = os.fspath(path)
        if tensor is not None:
            self.tensor = tensor


class FastqIOError(FastqError, OSError):
    """The operating system refused to open, map, read or write a file."""


class MissingFileError(FastqError, FileNotFoundError):
    """A checkpoint file or a shard named by the index is not on disk."""


class HeaderError(FastqError, ValueError):
    """A safetensors header or index that lies about its contents."""


class TruncatedShardError(HeaderError):
    """A shard ends before the data its header promises."""


class QuantStateError(HeaderError):
    """A pre-quantized checkpoint whose quant_state or statistics do not fit the weight they belong to."""


class UnknownTensorError(FastqError, KeyError):
    """No tensor of that name in the checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(FastqError, TypeError):
    """A dtype that cannot be quantized or is unknown to safetensors."""


class NonFiniteError(FastqError, ValueError):
    """NaN or infinity in a weight to be quantized."""


class ShapeError(FastqError, ValueError):
    """A shape the operation cannot handle."""


class InvalidArgumentError(FastqError, ValueError):
    """An argument outside what bitsandbytes accepts."""


class ConfigError(FastqError, ValueError):
    """An invalid quantization configuration."""


class ConfigFileError(ConfigError):
    """A checkpoint's config.json that fastq cannot use (``path`` is the file): empty, not JSON, not a JSON
    object, one transformers refuses, or a ``quantization_config`` that is not an object or is not
    bitsandbytes' (a GPTQ or AWQ checkpoint)."""


class OutputExistsError(FastqError, FileExistsError):
    """The destination exists and ``overwrite`` was not asked for."""


class PartialShareError(FastqError, RuntimeError):
    """A model loaded with its FSDP share (``fastq.load(..., shard=...)``) run before ``fully_shard``
    replaced its parameters: each holds only this rank's rows."""


class ConversionLockedError(FastqError, BlockingIOError):
    """Another conversion is writing into the same temporary folder."""


class UnsavableModelError(FastqError, ValueError):
    """The model's quantized state cannot be saved faithfully any more."""


class CancelledError(FastqError):
    """A run stopped before it finished because its caller asked it to."""


class DeviceError(FastqError, RuntimeError):
    """The GPU's driver refused a call fastq made to it (no driver, no context, a failed copy)."""


class InternalError(FastqError, RuntimeError):
    """Something fastq needs failed that no input explains (a worker thread could not start or
    panicked): a bug or an exhausted resource; please report it."""
