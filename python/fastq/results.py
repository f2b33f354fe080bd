"""The Rust core's results as what bitsandbytes holds: a ``Packed4bit`` as ``(packed, QuantState)``, a
``PackedInt8`` as ``(CB, SCB)``. Tensors wrap the Rust-owned buffers without a copy (then move to the
device if one is asked for)."""

from __future__ import annotations

import torch

from . import _fastq
from .dtypes import torch_dtype
from .errors import ShapeError

__all__ = ["int8_from_result", "packed_rows", "quant_state", "quant_state_from_result", "raw_bytes", "wrap"]


def wrap(buf, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor over a Rust buffer, without copying."""
    shape = tuple(shape)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def raw_bytes(t: torch.Tensor):
    """The bytes of ``t`` (moved to the CPU and made contiguous if it must be) as a uint8 array."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _code(quant_type: str, device) -> torch.Tensor:
    return torch.tensor(_fastq.code_4bit(quant_type), dtype=torch.float32, device=device)


def _dynamic_map(device) -> torch.Tensor:
    return torch.tensor(_fastq.dynamic_map(), dtype=torch.float32, device=device)


def _f32(buf) -> torch.Tensor:
    return wrap(buf, torch.float32, (len(buf) // 4,))


def packed_rows(nbytes: int, quant_storage: torch.dtype) -> int:
    """Rows of the ``[rows, 1]`` tensor that ``nbytes`` packed 4-bit bytes make in ``quant_storage``.

    Raises:
        ShapeError: the bytes cannot be viewed as that dtype.
    """
    item = quant_storage.itemsize
    if nbytes % item:
        raise ShapeError(f"{nbytes} packed bytes cannot be viewed as {quant_storage} ({item} bytes each)")
    return nbytes // item


def quant_state_from_result(res: _fastq.Packed4bit, device=None, quant_storage: torch.dtype = torch.uint8):
    """(packed weight, QuantState) of a 4-bit result, on ``device`` (default: the CPU).

    Args:
        res: a ``Packed4bit`` of the Rust core.
        device: where the tensors go.
        quant_storage: the dtype the packed bytes are viewed as (``bnb_4bit_quant_storage``).

    Returns:
        ``(packed, state)`` as ``bitsandbytes.functional.quantize_4bit`` returns them.
    """
    device = torch.device(device or "cpu")
    nbytes = len(res.codes)
    packed = wrap(res.codes, torch.uint8, (nbytes,))
    if quant_storage != torch.uint8:
        packed_rows(nbytes, quant_storage)
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1).to(device)
    nested = None if res.nested_codes is None else (res.nested_codes, res.nested_absmax, res.offset)
    absmax = None if res.absmax is None else _f32(res.absmax)
    state = quant_state(res.shape, torch_dtype(res.dtype), res.blocksize, res.quant_type, absmax, nested, device)
    return packed, state


def quant_state(shape, dtype: torch.dtype, blocksize: int, quant_type: str, absmax: torch.Tensor | None,
                nested: tuple | None = None, device=None):
    """bitsandbytes' ``QuantState`` of a 4-bit weight from its statistics.

    Args:
        shape: the weight's shape.
        dtype: the dtype it was quantized from (and dequantizes to).
        blocksize: its 4-bit blocksize.
        quant_type: "nf4" or "fp4".
        absmax: the float32 absmax per block (None with ``nested``).
        nested: double quant's ``(codes, absmax per 256 codes, offset)`` (Rust buffers and a float, as
            ``Packed4bit`` and ``_fastq.quantize_nested`` give them), or None.
        device: where the tensors go (default: the CPU).

    Returns:
        The ``QuantState`` (nested: its ``state2`` over the dynamic map, blocksize 256).
    """
    from bitsandbytes.functional import QuantState

    device = torch.device(device or "cpu")
    common = {
        "shape": torch.Size(shape),
        "dtype": dtype,
        "blocksize": blocksize,
        "code": _code(quant_type, device),
        "quant_type": quant_type,
    }
    if nested is not None:
        codes, absmax2, offset = nested
        state2 = QuantState(absmax=_f32(absmax2).to(device), code=_dynamic_map(device), blocksize=256,
                            dtype=torch.float32)
        codes = wrap(codes, torch.uint8, (len(codes),)).to(device)
        offset = torch.tensor(offset, dtype=torch.float32, device=device)
        return QuantState(absmax=codes, offset=offset, state2=state2, **common)
    return QuantState(absmax=absmax.to(device), **common)


def int8_from_result(res: _fastq.PackedInt8, device=None):
    """(CB, SCB) of an int8 result, on ``device`` (default: the CPU, without a copy)."""
    cb = wrap(res.CB, torch.int8, res.shape)
    scb = wrap(res.SCB, torch.float32, (res.shape[0],))
    if device is not None and torch.device(device).type != "cpu":
        cb, scb = cb.to(device), scb.to(device)
    return cb, scb
