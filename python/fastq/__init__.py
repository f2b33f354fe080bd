"""fastq: a Rust-accelerated loader for 4-bit and 8-bit (bitsandbytes) quantized PyTorch models.

    import fastq
    model = fastq.load("path/to/model", fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "auto")
"""

from . import ops
from ._fastq import __version__
from .checkpoint import SPEC_INT8, Checkpoint, Spec4bit, TensorMeta, open
from .config import QuantConfig
from .convert import convert
from .errors import (
    CancelledError,
    ConfigError,
    ConfigFileError,
    ConversionLockedError,
    FastqError,
    FastqIOError,
    HeaderError,
    InternalError,
    InvalidArgumentError,
    MissingFileError,
    NonFiniteError,
    OutputExistsError,
    ShapeError,
    TruncatedShardError,
    UnknownTensorError,
    UnsavableModelError,
    UnsupportedDtypeError,
)
from .loader import load, load_and_quantize_model
from .save import save

__all__ = [
    "SPEC_INT8",
    "CancelledError",
    "Checkpoint",
    "ConfigError",
    "ConfigFileError",
    "ConversionLockedError",
    "FastqError",
    "FastqIOError",
    "HeaderError",
    "InternalError",
    "InvalidArgumentError",
    "MissingFileError",
    "NonFiniteError",
    "OutputExistsError",
    "QuantConfig",
    "ShapeError",
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
