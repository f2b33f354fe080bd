"""safetensors' dtype names and the names torch gives the same dtypes (``"BF16"`` <-> ``"bfloat16"``),
without torch: the torch-free half of the dtype table, so that ``fastq inspect`` estimates a load from
the headers and config.json alone. dtypes.py builds the torch dtypes from it."""

from __future__ import annotations

__all__ = ["FLOAT_INPUT_NAMES", "ST_TO_NAME", "st_of_name"]

#: safetensors' dtype names and torch's names of the dtypes they hold (safetensors' ``_TYPES``).
ST_TO_NAME: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

#: safetensors' names of the float dtypes a weight can be quantized from, in dtypes.FLOAT_INPUTS' order.
FLOAT_INPUT_NAMES: tuple[str, ...] = ("F16", "BF16", "F32")

_NAME_TO_ST = {v: k for k, v in ST_TO_NAME.items()}


def st_of_name(name: str) -> str | None:
    """safetensors' name of the dtype torch calls ``name`` (``"bfloat16"`` or ``"torch.bfloat16"`` ->
    ``"BF16"``); None for a name torch does not give a dtype."""
    return _NAME_TO_ST.get(name.removeprefix("torch."))
