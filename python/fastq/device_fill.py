"""The GPU fill: every tensor bound for a CUDA device goes through the pinned ring (transfer.py) into
device memory, and weights to quantize are quantized there by bitsandbytes' own CUDA kernels, the
calls transformers makes (``Params4bit._quantize``: ``quantize_4bit`` with compress_statistics;
``Int8Params._quantize``: float16, then ``int8_vectorwise_quant``). The bytes are then those of
transformers + bitsandbytes on the same GPU by construction, double-quant offsets and int8 included.

Pre-quantized tensors (fastq's and transformers' checkpoints) and unquantized ones take the same
ring straight into their parameters: no per-tensor copy from pageable memory. When every tensor goes
to one GPU they have been streaming there since before the skeleton was built (early_reads.py), and
the fill takes each as it lands.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from . import device_map as dmap_mod
from .bnb_format import QUANT_STATE, SCB, WEIGHT_FORMAT, quant_state_stat
from .checkpoint import SPEC_INT8
from .device_map import cuda_device
from .install import get_submodule, prequantized_4bit, prequantized_int8, set_4bit, set_int8, set_plain
from .transfer import Request, Timeline, device_bytes, reserve_cached, stream_to_device

if TYPE_CHECKING:
    from .early_reads import EarlyReads

__all__ = ["fill_on_device", "warm_kernels"]

def _weight(ckpt, name: str, buf: torch.Tensor) -> torch.Tensor:
    """The device bytes ``buf`` of checkpoint tensor ``name`` as a tensor of its dtype and shape."""
    m = ckpt.meta(name)
    return buf.view(m.torch_dtype).view(m.shape)


_CODES: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16-value code of ``quant_type`` on ``device``, made once per process (its
    ``get_4bit_type`` builds it with ``torch.tensor(list, device=...)``: an upload from pageable memory,
    which synchronizes the stream). That call makes it in torch's default dtype, which is process-wide
    and which transformers changes while it builds a model (the warm-up runs then): the cache is kept
    per default dtype, so the code is always the one ``get_4bit_type`` would make at that moment."""
    import bitsandbytes.functional as bf

    key = (quant_type, device, torch.get_default_dtype())
    if key not in _CODES:
        _CODES[key] = bf.get_4bit_type(quant_type, device=device)
    return _CODES[key]


def _quantize_4bit(w: torch.Tensor, spec):
    """``bitsandbytes.functional.quantize_4bit(w, ...)`` step for step - the same op, the same mean and
    nested ``quantize_blockwise``, the same ``QuantState`` - except that the code is a device-side copy of
    one made once: bitsandbytes' own call uploads it from pageable memory at every weight, and that
    upload waits for everything queued on the stream, so the fill's host could never run ahead of the
    GPU (BENCHMARKS.md, run 10). The bytes are bitsandbytes' (tests/test_gpu.py, tests/test_quantize_bnb.py)."""
    import bitsandbytes.functional as bf

    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, spec.blocksize, spec.quant_type,
                                                                  spec.quant_storage)
    code = _code(spec.quant_type, w.device).clone()
    common = {"shape": w.shape, "dtype": w.dtype, "blocksize": spec.blocksize, "code": code,
              "quant_type": spec.quant_type}
    if not spec.double_quant:
        return packed, bf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bf.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _bnb_quantize(w: torch.Tensor, spec):
    """bitsandbytes' CUDA quantization of ``w`` as transformers runs it: ``(packed, QuantState)`` for a
    4-bit spec (``Params4bit._quantize``: ``quantize_4bit`` with compress_statistics), ``(CB, SCB)`` for
    int8 (``Int8Params._quantize``: float16, then ``int8_vectorwise_quant``)."""
    import bitsandbytes.functional as bf

    if spec == SPEC_INT8:
        cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
        return cb, scb
    return _quantize_4bit(w, spec)


def warm_kernels(spec, device: torch.device) -> threading.Thread:
    """Runs bitsandbytes' quantizer for ``spec`` once on a few bytes of ``device``, in the background:
    its first call loads the CUDA kernels and sets up torch's dispatch for the op (62 ms for NF4, 28 ms
    for int8 on the H200, in the fill's critical path before; BENCHMARKS.md, run 7). Started while the
    skeleton is built; the GIL is released while the driver loads the kernels."""

    def run() -> None:
        try:
            with torch.cuda.device(device):
                _bnb_quantize(torch.zeros(256, spec.blocksize if spec != SPEC_INT8 else 64, dtype=torch.bfloat16,
                                          device=device), spec)
        except Exception:  # noqa: BLE001, S110 - only a warm-up: the fill's own call reports a failure
            pass

    t = threading.Thread(target=run, daemon=True, name="fastq-warm")
    t.start()
    return t


def fill_on_device(
    model, ckpt, entries, dmap: dict, spec, *, quantize: bool, threads=None, timeline: Timeline | None = None,
    on_placed=None, early: EarlyReads | None = None,
) -> list:
    """Places the plan entries whose device is a GPU through the ring.

    Args:
        model: the skeleton, bitsandbytes modules in place.
        ckpt: the opened checkpoint.
        entries: plan entries of any kind; those on the CPU or disk are returned untouched.
        dmap: the resolved device map.
        spec: the quantization spec (``Spec4bit`` or ``SPEC_INT8``), None without quantization.
        quantize: quantize "4bit" / "int8" entries on the device; when False they are returned too.
        threads: reader threads.
        timeline: where to record the stages' spans.
        on_placed: called with each entry once its tensor is in place (progress).
        early: the tensors already streaming to their GPU (``early_reads.start_early_reads``), taken first.

    Returns:
        The entries left for the host path.
    """
    left, by_device = [], {}
    for e in entries:
        dev = cuda_device(dmap_mod.device_of(e.name, dmap))
        if dev is None or e.kind == "tied" or (e.kind in ("4bit", "int8") and not quantize):
            left.append(e)
        else:
            by_device.setdefault(dev, []).append(e)
    if early is not None and early.device not in by_device:
        early.cancel()
    for dev, group in by_device.items():
        _fill_one(model, ckpt, group, dev, spec, threads, timeline, on_placed,
                  early if early is not None and early.device == dev else None)
    return left


def _fill_one(model, ckpt, entries, dev: torch.device, spec, threads, timeline, on_placed, early) -> None:
    requests, parts = [], {}
    for e in entries:
        if e.pieces:  # assembled from several checkpoint tensors into one device buffer
            parts[id(e)] = (e, {}, 1)
            requests.append(Request((id(e), "weight", e.source), e.source, e.nbytes, e.pieces))
            continue
        names = [("weight", e.source)]
        if e.kind in ("4bit-pre", "int8-pre"):
            names += [(k, v) for k, v in e.extra.items() if k not in (QUANT_STATE, WEIGHT_FORMAT)]
        parts[id(e)] = (e, {}, len(names))
        for part, src in names:
            requests.append(Request((id(e), part, src), src, ckpt.meta(src).nbytes, shared=_kept(model, e)))

    def on_ready(key, buf: torch.Tensor) -> None:
        eid, part, src = key
        e, got, need = parts[eid]
        got[part] = buf.view(ckpt.meta(src).torch_dtype).view(e.shape) if e.pieces else _weight(ckpt, src, buf)
        if len(got) == need:
            del parts[eid]
            _place(model, ckpt, e, got, dev, spec)
            if on_placed is not None:
                on_placed(e)

    if early is not None:
        requests = _take_early(early, requests, on_ready)
    else:
        reserve_cached(dev, device_bytes(r for r in requests if r.shared))
    stream_to_device(ckpt, requests, dev, on_ready, threads=threads, timeline=timeline)


def _take_early(early: EarlyReads, requests: list, on_ready) -> list:
    """Hands each early buffer to the requests for its tensor as it lands (a copy to every one but the
    last, when several parameters read one tensor; none when no parameter does, and it is freed);
    returns the requests still to read (assembled ones, and any tensor the early reads did not bring)."""
    wanted: dict[str, list] = {}
    for r in requests:
        if not r.pieces:
            wanted.setdefault(r.tensor, []).append(r)
    for name, buf in early.arrivals():
        rs = wanted.pop(name, [])
        for k, r in enumerate(rs):
            on_ready(r.key, buf if k == len(rs) - 1 else buf.clone())
    left = {id(r) for rs in wanted.values() for r in rs}
    return [r for r in requests if r.pieces or id(r) in left]


def _kept(model, e) -> bool:
    """Whether the entry's device buffers become its tensors as they are: not quantized or cast there,
    nor handed to a ``QuantizedExperts``, which quantizes them per expert and drops the bytes."""
    if e.kind in ("4bit-pre", "int8-pre"):
        return True
    if e.kind != "plain" or e.dtype is not None:
        return False
    from .experts import QuantizedExperts

    return not isinstance(get_submodule(model, e.module), QuantizedExperts)


def _place(model, ckpt, e, got: dict, dev: torch.device, spec) -> None:
    w = got.pop("weight")
    if e.kind == "plain":
        set_plain(model, e.name, w.t() if e.transpose else w, dev, e.dtype)
        return
    module = get_submodule(model, e.module)
    if e.kind in ("4bit", "int8"):
        if e.dtype is not None:
            w = w.to(e.dtype)  # transformers materializes the weight in the model's dtype first
        if e.transpose:
            w = w.t()  # GPT-2's Conv1D: transformers quantizes value.T
        install = set_int8 if spec == SPEC_INT8 else set_4bit
        install(module, *_bnb_quantize(w.contiguous(), spec), dev)
    elif e.kind == "4bit-pre":
        qs = e.extra[QUANT_STATE]  # "<module>.weight.quant_state.bitsandbytes__nf4": JSON, read on the host
        got[quant_state_stat(qs)] = ckpt.get(qs)
        prequantized_4bit(module, w, got, dev)
    else:
        prequantized_int8(module, w, got[SCB], dev)
