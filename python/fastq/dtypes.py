"""The dtype table, in one place: safetensors' dtype names, the torch dtypes they stand for, and the
float dtypes the quantizers accept. Every module that turns one into the other asks here."""

from __future__ import annotations

import torch

from .errors import UnsupportedDtypeError

__all__ = [
    "FLOAT_INPUTS",
    "ST_TO_TORCH",
    "TORCH_TO_ST",
    "float_input_name",
    "st_name",
    "torch_dtype",
]

#: safetensors' dtype names and the torch dtypes they hold (safetensors' ``_TYPES``).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

#: The reverse table.
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

#: The float dtypes a weight can be quantized from (the Rust kernels read these), which are also the
#: compute dtypes bitsandbytes' modules accept (config.py validates against this tuple, in this order).
FLOAT_INPUTS: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


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
