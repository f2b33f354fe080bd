"""fastq: a Rust-accelerated loader for 4-bit and 8-bit (bitsandbytes) quantized PyTorch models.

    import fastq
    model = fastq.load("path/to/model", fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "auto")
"""

from . import ops
from ._fastq import __version__
from .checkpoint import SPEC_INT8, Checkpoint, Spec4bit, TensorMeta, open
from .config import QuantConfig
from .convert import ConversionLockedError, OutputExistsError, convert
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .loader import load, load_and_quantize_model
from .save import save

__all__ = [
    "__version__",
    "load",
    "load_and_quantize_model",
    "convert",
    "save",
    "OutputExistsError",
    "ConversionLockedError",
    "QuantConfig",
    "ops",
    "open",
    "Checkpoint",
    "TensorMeta",
    "Spec4bit",
    "SPEC_INT8",
    *_errors_all,
]
