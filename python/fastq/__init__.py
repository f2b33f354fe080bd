"""fastq: a Rust-accelerated loader for 4-bit and 8-bit (bitsandbytes) quantized PyTorch models."""

from . import ops
from ._fastq import __version__
from .checkpoint import SPEC_INT8, Checkpoint, Spec4bit, TensorMeta, open
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__all__ = ["__version__", "ops", "open", "Checkpoint", "TensorMeta", "Spec4bit", "SPEC_INT8", *_errors_all]
