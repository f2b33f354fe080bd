"""Single-tensor quantization with the Rust kernels, returning what bitsandbytes returns (the result
wrappers are in ``results.py``).

``quantize_4bit`` gives ``(packed, QuantState)`` that ``bitsandbytes.functional.dequantize_4bit``
accepts; ``quantize_int8`` gives ``(CB, SCB)`` as ``Int8Params`` holds them. Results wrap Rust-owned
buffers (no copy); the GIL is released while the kernels run.
"""

from __future__ import annotations

import math

import torch

from . import _fastq
from .dtypes import float_input_name
from .results import int8_from_result, quant_state_from_result, raw_bytes

__all__ = ["dequantize_4bit", "kernel_name", "quantize_4bit", "quantize_int8", "thread_count"]

kernel_name = _fastq.kernel_name
thread_count = _fastq.thread_count


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
    """Quantizes ``t`` to 4 bits as ``bitsandbytes.functional.quantize_4bit`` does on a GPU (its CUDA
    kernel's codes, absmax and nested statistics; README "How exact it is").

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
        raw_bytes(t), float_input_name(t.dtype), list(t.shape), quant_type, blocksize, compress_statistics, threads, reference
    )
    return quant_state_from_result(res, t.device, quant_storage)


def quantize_int8(t: torch.Tensor, *, threads: int | None = None, reference: bool = False):
    """LLM.int8 row-wise quantization of a 2-D weight, as bitsandbytes' ``Int8Params`` does it.

    Args:
        t: float32, float16 or bfloat16 weight of shape ``[out, in]``.
        threads: worker threads (default: ``FASTQ_NUM_THREADS`` or every core).
        reference: use the scalar reference kernel.

    Returns:
        ``(CB, SCB)``: int8 weight ``[out, in]`` and float32 per-row scale ``[out]``.
    """
    res = _fastq.quantize_int8(raw_bytes(t), float_input_name(t.dtype), list(t.shape), threads, reference)
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
