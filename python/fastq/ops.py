"""Single-tensor quantization with the Rust kernels, returning what bitsandbytes returns.

``quantize_4bit`` gives ``(packed, QuantState)`` that ``bitsandbytes.functional.dequantize_4bit``
accepts; ``quantize_int8`` gives ``(CB, SCB)`` as ``Int8Params`` holds them. Results wrap Rust-owned
buffers (no copy); the GIL is released while the kernels run.
"""

from __future__ import annotations

import math

import torch

from . import _fastq

__all__ = ["dequantize_4bit", "kernel_name", "quantize_4bit", "quantize_int8", "thread_count"]

_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
ST_TO_TORCH = {
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
ST_TO_TORCH_NAME = {k: str(v).removeprefix("torch.") for k, v in ST_TO_TORCH.items()}

kernel_name = _fastq.kernel_name
thread_count = _fastq.thread_count


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


def _dtype_name(t: torch.Tensor) -> str:
    try:
        return _TORCH_TO_ST[t.dtype]
    except KeyError:
        from .errors import UnsupportedDtypeError

        raise UnsupportedDtypeError(
            f"cannot quantize a {t.dtype} tensor: float32, float16 or bfloat16 only"
        ) from None


def _code(quant_type: str, device) -> torch.Tensor:
    return torch.tensor(_fastq.code_4bit(quant_type), dtype=torch.float32, device=device)


def _dynamic_map(device) -> torch.Tensor:
    return torch.tensor(_fastq.dynamic_map(), dtype=torch.float32, device=device)


def quant_state_from_result(res: dict, device=None, quant_storage: torch.dtype = torch.uint8):
    """(packed weight, QuantState) from a 4-bit result dict of the Rust core."""
    from bitsandbytes.functional import QuantState

    device = torch.device(device or "cpu")
    shape = torch.Size(res["shape"])
    dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[res["dtype"]])
    nbytes = len(res["codes"])
    packed = wrap(res["codes"], torch.uint8, (nbytes,))
    if quant_storage != torch.uint8:
        item = torch.empty((), dtype=quant_storage).element_size()
        if nbytes % item:
            from .errors import ShapeError

            raise ShapeError(f"{nbytes} packed bytes cannot be viewed as {quant_storage} ({item} bytes each)")
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1).to(device)
    code = _code(res["quant_type"], device)
    if res["nested_codes"] is not None:
        nested_absmax = wrap(res["nested_absmax"], torch.float32, (len(res["nested_absmax"]) // 4,))
        state2 = QuantState(
            absmax=nested_absmax.to(device), code=_dynamic_map(device), blocksize=256, dtype=torch.float32
        )
        absmax = wrap(res["nested_codes"], torch.uint8, (len(res["nested_codes"]),)).to(device)
        state = QuantState(
            absmax=absmax,
            shape=shape,
            dtype=dtype,
            blocksize=res["blocksize"],
            code=code,
            quant_type=res["quant_type"],
            offset=torch.tensor(res["offset"], dtype=torch.float32, device=device),
            state2=state2,
        )
    else:
        absmax = wrap(res["absmax"], torch.float32, (len(res["absmax"]) // 4,)).to(device)
        state = QuantState(
            absmax=absmax, shape=shape, dtype=dtype, blocksize=res["blocksize"], code=code,
            quant_type=res["quant_type"],
        )
    return packed, state


def quantize_4bit(
    t: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    *,
    threads: int | None = None,
    reference: bool = False,
):
    """Quantizes ``t`` to 4 bits exactly as ``bitsandbytes.functional.quantize_4bit`` does.

    Args:
        t: float32, float16 or bfloat16 tensor of any shape (on any device; results come back there).
        blocksize: one of 32, 64, ..., 4096.
        quant_type: "nf4" or "fp4".
        compress_statistics: double-quantize the absmax (8-bit, blocksize 256, with an offset).
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bfloat16 for FSDP).
        threads: worker threads (default: ``FASTQ_NUM_THREADS`` or every core).
        reference: use the scalar reference kernel instead of the SIMD one.

    Returns:
        ``(packed, state)``: packed codes of shape ``[(n + 1) // 2, 1]`` and a bitsandbytes ``QuantState``.
    """
    res = _fastq.quantize_4bit(
        raw_bytes(t), _dtype_name(t), list(t.shape), quant_type, blocksize, compress_statistics, threads, reference
    )
    return quant_state_from_result(res, t.device, quant_storage)


def int8_from_result(res: dict, device=None):
    """(CB, SCB) from an int8 result dict of the Rust core."""
    rows = res["shape"][0]
    cb = wrap(res["CB"], torch.int8, res["shape"])
    scb = wrap(res["SCB"], torch.float32, (rows,))
    if device is not None and torch.device(device).type != "cpu":
        cb, scb = cb.to(device), scb.to(device)
    return cb, scb


def quantize_int8(t: torch.Tensor, *, threads: int | None = None, reference: bool = False):
    """LLM.int8 row-wise quantization of a 2-D weight, as bitsandbytes' ``Int8Params`` does it.

    Args:
        t: float32, float16 or bfloat16 weight of shape ``[out, in]``.
        threads: worker threads (default: ``FASTQ_NUM_THREADS`` or every core).
        reference: use the scalar reference kernel.

    Returns:
        ``(CB, SCB)``: int8 weight ``[out, in]`` and float32 per-row scale ``[out]``.
    """
    res = _fastq.quantize_int8(raw_bytes(t), _dtype_name(t), list(t.shape), threads, reference)
    return int8_from_result(res, t.device)


def _rows_cross_blocks(packed: torch.Tensor, state) -> bool:
    """Whether bitsandbytes' C++ CPU kernel would misread this weight: it decodes row by row as if every
    row started a block, which is wrong when a row's length is not a multiple of the blocksize
    (bitsandbytes 0.50.2, ``backends/cpu/ops.py``; its generic path, taken for odd rows, is right)."""
    shape = tuple(state.shape)
    return packed.device.type == "cpu" and len(shape) >= 2 and shape[-1] % state.blocksize != 0


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantizes a 4-bit weight as bitsandbytes does (for round trips and tests).

    Args:
        packed: packed codes as ``quantize_4bit`` returns them (any ``quant_storage``).
        state: its ``QuantState`` (nested or not).

    Returns:
        The weight in ``state.dtype`` and ``state.shape``: ``bitsandbytes.functional.dequantize_4bit``,
        except on the CPU for weights whose rows cross blocks, which its C++ kernel misreads; those are
        decoded as its generic kernel (``backends/default/ops.py``) does: code times block absmax in
        float32, then cast.
    """
    from bitsandbytes import functional as bf

    if not _rows_cross_blocks(packed, state):
        return bf.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    n = math.prod(state.shape)
    b = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    code = bf.get_4bit_type(state.quant_type, device=packed.device)
    out = code[idx] * absmax.repeat_interleave(state.blocksize)[:n]
    return out.reshape(state.shape).to(state.dtype)
