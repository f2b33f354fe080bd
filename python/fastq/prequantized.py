"""Checking a pre-quantized checkpoint before it is loaded: every 4-bit weight's ``quant_state`` JSON and
statistics, every int8 weight's ``SCB``, against the weight they belong to, from the headers alone.

bitsandbytes itself trusts them (``QuantState.from_dict``, ``Params4bit.from_prequantized``): a short
absmax or an SCB relabelled I32 loads into a wrong model, or fails on the first forward deep inside a
kernel. Here each is a ``QuantStateError`` naming the file and the tensor, at load.
"""

from __future__ import annotations

import json
import math

from .bnb_format import QUANT_STATE, quant_state_type
from .checkpoint import Checkpoint
from .config import BLOCKSIZES
from .errors import QuantStateError

__all__ = ["check_prequantized_4bit", "check_prequantized_int8", "read_quant_state"]

_FLOAT_NAMES = ("float32", "float16", "bfloat16")


def _fail(ckpt: Checkpoint, tensor: str, why: str) -> QuantStateError:
    file = ckpt.meta(tensor).file if tensor in ckpt else ckpt.path
    return QuantStateError(f"{file}: tensor '{tensor}': {why}", path=file, tensor=tensor)


def read_quant_state(ckpt: Checkpoint, key: str) -> dict:
    """The ``quant_state.bitsandbytes__<type>`` JSON of a 4-bit weight, parsed and checked for the
    fields ``QuantState.from_dict`` reads."""
    meta = ckpt.meta(key)
    if meta.dtype != "U8" or len(meta.shape) != 1:
        raise _fail(ckpt, key, f"a quant_state must be a 1-D U8 tensor of JSON, not {meta.dtype} {list(meta.shape)}")
    raw = bytes(ckpt.get(key).numpy().tobytes())
    try:
        qs = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(ckpt, key, f"the quant_state is not JSON ({e})") from None
    if not isinstance(qs, dict):
        raise _fail(ckpt, key, f"the quant_state is not a JSON object but {type(qs).__name__}")
    want = quant_state_type(key)
    checks = [
        ("quant_type", qs.get("quant_type") == want, f"'{want}' (as the key says)"),
        ("blocksize", qs.get("blocksize") in BLOCKSIZES, f"one of {list(BLOCKSIZES)}"),
        ("dtype", qs.get("dtype") in _FLOAT_NAMES, f"one of {list(_FLOAT_NAMES)}"),
        ("shape", _is_shape(qs.get("shape")), "a list of positive ints"),
    ]
    if "nested_blocksize" in qs or "nested_offset" in qs:
        checks += [
            ("nested_blocksize", qs.get("nested_blocksize") in BLOCKSIZES, f"one of {list(BLOCKSIZES)}"),
            ("nested_dtype", qs.get("nested_dtype") == "float32", "'float32'"),
            ("nested_offset", _is_number(qs.get("nested_offset")), "a finite number"),
        ]
    for field, ok, what in checks:
        if not ok:
            raise _fail(ckpt, key, f"quant_state field {field!r} is {qs.get(field)!r}; bitsandbytes needs {what}")
    return qs


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _expect(ckpt: Checkpoint, name: str | None, what: str, owner: str, dtype: str, numel: int) -> None:
    if name is None:
        raise _fail(ckpt, owner, f"the checkpoint has no {what} for this 4-bit weight ('{owner}.{what}')")
    meta = ckpt.meta(name)
    got = math.prod(meta.shape)
    if meta.dtype != dtype or got != numel:
        raise _fail(ckpt, name, f"{what} must be {numel} x {dtype} for the weight '{owner}', not {got} x {meta.dtype}")


def check_prequantized_4bit(ckpt: Checkpoint, weight: str, extra: dict[str, str]) -> dict:
    """Checks a saved 4-bit weight and its statistics; returns its parsed quant_state.

    Args:
        ckpt: the checkpoint.
        weight: the packed weight's tensor name.
        extra: its statistics' tensor names by suffix (``absmax``, ``quant_map``, ``nested_absmax``,
            ``nested_quant_map``, ``quant_state``), as the plan found them.

    Returns:
        The quant_state JSON as a dict.
    """
    qs = read_quant_state(ckpt, extra[QUANT_STATE])
    numel = math.prod(qs["shape"])
    meta = ckpt.meta(weight)
    packed = meta.nbytes
    if packed != (numel + 1) // 2:
        raise _fail(ckpt, weight, f"holds {packed} packed bytes, but its quant_state shape {qs['shape']} "
                                  f"needs {(numel + 1) // 2}")
    blocks = -(-numel // qs["blocksize"])
    _expect(ckpt, extra.get("quant_map"), "quant_map", weight, "F32", 16)
    if "nested_blocksize" in qs:
        _expect(ckpt, extra.get("absmax"), "absmax", weight, "U8", blocks)
        nested = -(-blocks // qs["nested_blocksize"])
        _expect(ckpt, extra.get("nested_absmax"), "nested_absmax", weight, "F32", nested)
        _expect(ckpt, extra.get("nested_quant_map"), "nested_quant_map", weight, "F32", 256)
    else:
        for stray in ("nested_absmax", "nested_quant_map"):
            if stray in extra:
                raise _fail(ckpt, extra[stray], "a nested statistic, but the quant_state has no nested fields")
        _expect(ckpt, extra.get("absmax"), "absmax", weight, "F32", blocks)
    return qs


def check_prequantized_int8(ckpt: Checkpoint, weight: str, scb: str) -> None:
    """Checks a saved LLM.int8 weight (I8, 2-D) and its row scales (``SCB``: F32, one per row)."""
    meta = ckpt.meta(weight)
    if len(meta.shape) != 2:
        raise _fail(ckpt, weight, f"an int8 weight must be 2-D, not {list(meta.shape)}")
    rows = meta.shape[0]
    s = ckpt.meta(scb)
    if s.dtype != "F32" or math.prod(s.shape) != rows:
        raise _fail(ckpt, scb, f"SCB must be {rows} x F32 (one scale per row of '{weight}'), "
                               f"not {math.prod(s.shape)} x {s.dtype}")
