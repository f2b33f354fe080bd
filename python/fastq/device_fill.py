"""The GPU fill: every tensor bound for a CUDA device goes through the pinned ring (transfer.py) into
device memory, and weights to quantize are quantized there by bitsandbytes' own CUDA kernels, the
calls transformers makes (``Params4bit._quantize``: ``quantize_4bit`` with compress_statistics;
``Int8Params._quantize``: float16, then ``int8_vectorwise_quant``). The bytes are then those of
transformers + bitsandbytes on the same GPU by construction, double-quant offsets and int8 included.

Pre-quantized tensors (fastq's and transformers' checkpoints) and unquantized ones take the same
ring straight into their parameters: no per-tensor copy from pageable memory. Such a load lands on
the device as it is stored, so its bytes need no plan: ``EarlyUpload`` streams the whole checkpoint
from before the model skeleton is built (loader.py), and the fill places the buffers as they come.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading

import torch

from . import device_map as dmap_mod
from .bnb_format import QUANT_STATE, SCB, WEIGHT_FORMAT, quant_state_stat
from .checkpoint import SPEC_INT8
from .errors import InternalError
from .install import get_submodule, prequantized_4bit, prequantized_int8, set_4bit, set_int8, set_plain
from .transfer import Request, Timeline, ring_for, stream_to_device

__all__ = ["EarlyUpload", "cuda_device", "fill_on_device"]

#: The interpreter's thread switch interval while the early upload runs beside the skeleton: the
#: upload thread needs the GIL for a few microseconds per 64 MiB batch, and the default 5 ms wait for
#: it would cap the upload at ~13 GB/s while Python builds the model.
SWITCH_INTERVAL_S = 0.0005


class EarlyUpload:
    """Every tensor of ``ckpt`` streamed to ``device`` in file order by a background thread, started
    before the model exists; ``buffers()`` hands them over in that order. For loads whose tensors land
    on the device as stored (no quantization, or a pre-quantized checkpoint): device memory holds
    nothing beyond the model, and the reads overlap building it."""

    def __init__(self, ckpt, device: torch.device, threads=None, timeline: Timeline | None = None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL_S))
        requests = [Request(name, name, ckpt.meta(name).nbytes) for name in ckpt]
        # The caller's stream: what it queues later runs after the copies. (A CPU "device" runs the same
        # steps, for tests.)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if stream is not None:
            ring_for()
        self._thread = threading.Thread(
            target=self._run, args=(ckpt, requests, device, stream, threads, timeline), daemon=True, name="fastq-early"
        )
        self._thread.start()

    def _run(self, ckpt, requests, device, stream, threads, timeline) -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                stream_to_device(
                    ckpt, requests, device, lambda key, buf: self._queue.put((key, buf)), threads=threads,
                    timeline=timeline, stop=self._stop,
                )
        except BaseException as e:  # noqa: BLE001 - raised in the loading thread by buffers()
            self._error = e
        finally:
            self._queue.put(None)

    def consuming(self) -> None:
        """The model is built: the loading thread now takes the buffers, so the default switch interval
        comes back."""
        sys.setswitchinterval(self._switch)

    def buffers(self):
        """``(tensor name, uint8 device buffer)`` as each arrives; re-raises the upload's error."""
        self.consuming()
        while (item := self._queue.get()) is not None:
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stops reading (the load failed before the fill) and waits for the reads in flight."""
        self.consuming()
        self._stop.set()
        self._thread.join()


def cuda_device(dev) -> torch.device | None:
    """The CUDA device a device-map value names, or None for the CPU and disk."""
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    if isinstance(dev, str) and dev.startswith("cuda"):
        d = torch.device(dev)
        return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())
    return None


def _weight(ckpt, name: str, buf: torch.Tensor) -> torch.Tensor:
    """The device bytes ``buf`` of checkpoint tensor ``name`` as a tensor of its dtype and shape."""
    m = ckpt.meta(name)
    return buf.view(m.torch_dtype).view(m.shape)


def _quantize_4bit(module, w: torch.Tensor, spec, dev: torch.device) -> None:
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(
        w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type,
        quant_storage=spec.quant_storage,
    )
    set_4bit(module, packed, state, dev)


def _quantize_int8(module, w: torch.Tensor, dev: torch.device) -> None:
    import bitsandbytes.functional as bf

    cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))  # Int8Params._quantize's float16 step
    set_int8(module, cb, scb, dev)


def fill_on_device(
    model, ckpt, entries, dmap: dict, spec, *, quantize: bool, threads=None, timeline: Timeline | None = None,
    on_placed=None, early: EarlyUpload | None = None,
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
        early: the upload of the whole checkpoint already under way (every entry is then on its device).

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
    if early is not None:
        if left or len(by_device) != 1:
            raise InternalError("an early upload goes to one device, with every entry on it")
        (dev, group), = by_device.items()
        _fill_early(model, ckpt, group, dev, early, on_placed)
        return left
    for dev, group in by_device.items():
        _fill_one(model, ckpt, group, dev, spec, threads, timeline, on_placed)
    return left


def _parts(e) -> list[tuple[str, str]]:
    """``(part, checkpoint tensor)`` that placing entry ``e`` takes (the weight, and a pre-quantized
    weight's statistics; its quant_state JSON is read on the host)."""
    names = [("weight", e.source)]
    if e.kind in ("4bit-pre", "int8-pre"):
        names += [(k, v) for k, v in e.extra.items() if k not in (QUANT_STATE, WEIGHT_FORMAT)]
    return names


def _fill_early(model, ckpt, entries, dev: torch.device, early: EarlyUpload, on_placed) -> None:
    """Places the entries from the early upload's buffers as they arrive; a tensor assembled from
    several checkpoint tensors is put together on the device once its pieces are in."""
    waiting: dict[str, list] = {}  # checkpoint tensor -> (entry, part) that take it
    got: dict[int, tuple] = {}
    for e in entries:
        parts = [(("piece", src), src) for src, _, _ in e.pieces] if e.pieces else _parts(e)
        got[id(e)] = (e, {}, len(parts))
        for part, src in parts:
            waiting.setdefault(src, []).append((e, part))
    for name, buf in early.buffers():
        for e, part in waiting.pop(name, ()):
            _, have, need = got[id(e)]
            have[part] = buf
            if len(have) < need:
                continue
            del got[id(e)]
            if e.pieces:
                whole = torch.empty(e.nbytes, dtype=torch.uint8, device=dev)
                for src, at, n in e.pieces:
                    whole[at : at + n].copy_(have[("piece", src)])
                have = {"weight": whole.view(ckpt.meta(e.source).torch_dtype).view(e.shape)}
            else:
                have = {p: _weight(ckpt, src, have[p]) for p, src in _parts(e)}
            _place(model, ckpt, e, have, dev, None)
            if on_placed is not None:
                on_placed(e)
    if got:
        names = ", ".join(e.name for e, _, _ in list(got.values())[:3])
        raise InternalError(f"{ckpt.path}: the early upload ended before {names} arrived")


def _fill_one(model, ckpt, entries, dev: torch.device, spec, threads, timeline, on_placed) -> None:
    requests, parts = [], {}
    for e in entries:
        if e.pieces:  # assembled from several checkpoint tensors into one device buffer
            parts[id(e)] = (e, {}, 1)
            requests.append(Request((id(e), "weight", e.source), e.source, e.nbytes, e.pieces))
            continue
        names = _parts(e)
        parts[id(e)] = (e, {}, len(names))
        for part, src in names:
            requests.append(Request((id(e), part, src), src, ckpt.meta(src).nbytes))

    def on_ready(key, buf: torch.Tensor) -> None:
        eid, part, src = key
        e, got, need = parts[eid]
        got[part] = buf.view(ckpt.meta(src).torch_dtype).view(e.shape) if e.pieces else _weight(ckpt, src, buf)
        if len(got) == need:
            del parts[eid]
            _place(model, ckpt, e, got, dev, spec)
            if on_placed is not None:
                on_placed(e)

    stream_to_device(ckpt, requests, dev, on_ready, threads=threads, timeline=timeline)


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
        w = w.contiguous()
        if spec == SPEC_INT8:
            _quantize_int8(module, w, dev)
        else:
            _quantize_4bit(module, w, spec, dev)
    elif e.kind == "4bit-pre":
        qs = e.extra[QUANT_STATE]  # "<module>.weight.quant_state.bitsandbytes__nf4": JSON, read on the host
        got[quant_state_stat(qs)] = ckpt.get(qs)
        prequantized_4bit(module, w, got, dev)
    else:
        prequantized_int8(module, w, got[SCB], dev)
