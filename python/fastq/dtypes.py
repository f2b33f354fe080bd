"""The dtype table, in one place: safetensors' dtype names, the torch dtypes they stand for, and the
float dtypes the quantizers accept. Every module that turns one into the other asks here."""

from __future__ import annotations

import torch

from .dtype_names import FLOAT_INPUT_NAMES, ST_TO_NAME
from .errors import UnsupportedDtypeError

__all__ = [
    "FLOAT_INPUTS",
    "ST_TO_TORCH",
    "TORCH_TO_ST",
    "float_input_name",
    "st_name",
    "torch_dtype",
]

#: safetensors' dtype names and the torch dtypes they hold (safetensors' ``_TYPES``; the names in
#: dtype_names.py, which needs no torch).
ST_TO_TORCH: dict[str, torch.dtype] = {st: getattr(torch, name) for st, name in ST_TO_NAME.items()}

#: The reverse table.
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

#: The float dtypes a weight can be quantized from (the Rust kernels read these), which are also the
#: compute dtypes bitsandbytes' modules accept (config.py validates against this tuple, in this order).
FLOAT_INPUTS: tuple[torch.dtype, ...] = tuple(ST_TO_TORCH[n] for n in FLOAT_INPUT_NAMES)


def st_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise UnsupportedDtypeError(f"{dtype} has no safetensors dtype") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return ST_TO_TORCH[name]
    except KeyError:
        raise UnsupportedDtypeError(f"unknown safetensors dtype {name!r}") from None


def float_input_name(dtype: torch.dtype) -> str:
    """safetensors' name of a dtype the quantizers read; an ``UnsupportedDtypeError`` for any other."""
    if dtype not in FLOAT_INPUTS:
        raise UnsupportedDtypeError(f"cannot quantize a {dtype} tensor: float32, float16 or bfloat16 only")
    return TORCH_TO_ST[dtype]
