"""The GPU fill: every tensor bound for a CUDA device goes through the pinned ring (transfer.py) into
device memory, and weights to quantize are quantized there by bitsandbytes' own CUDA kernels, the
calls transformers makes (``Params4bit._quantize``: ``quantize_4bit`` with compress_statistics;
``Int8Params._quantize``: float16, then ``int8_vectorwise_quant``). The bytes are then those of
transformers + bitsandbytes on the same GPU by construction, double-quant offsets and int8 included.

Pre-quantized tensors (fastq's and transformers' checkpoints) and unquantized ones take the same
ring straight into their parameters: no per-tensor copy from pageable memory. Neither needs the plan to
be read, so when every tensor goes to one GPU they start streaming there while transformers builds the
skeleton (``EarlyReads``), and the fill takes the tensors as they arrive. The stream then runs whole in
Rust (``_fastq.Upload``): the same loop in Python fought the skeleton's build for the GIL - a
pre-quantized checkpoint's ~1,400 small statistics tensors most (BENCHMARKS.md runs 11-13).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch

from . import _fastq
from . import device_map as dmap_mod
from .bnb_format import (
    QUANT_STATE,
    QUANT_STATE_SUFFIXES,
    SCB,
    WEIGHT_FORMAT,
    quant_state_owner,
    quant_state_stat,
)
from .checkpoint import SPEC_INT8
from .install import get_submodule, prequantized_4bit, prequantized_int8, set_4bit, set_int8, set_plain
from .transfer import (
    ALIGN,
    SLOT_BYTES,
    PinnedRing,
    Request,
    Timeline,
    copy_stream,
    device_bytes,
    reserve_cached,
    ring_for,
    stream_to_device,
)

__all__ = ["EarlyReads", "cuda_device", "early_names", "fill_on_device", "start_early_reads", "warm_kernels"]

#: Stream a checkpoint bound whole for one GPU there while the skeleton is built: unquantized and
#: pre-quantized ("1", the default), unquantized only ("plain", as before run 15), or neither ("0":
#: every tensor read once the plan is made).
EARLY_READS = os.environ.get("FASTQ_EARLY_READS", "1")


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


#: The GIL switch interval while early reads run (CPython's default is 5 ms).
EARLY_SWITCH_INTERVAL = 2e-4
_SWITCH_LOCK = threading.Lock()
_switch = {"active": 0, "saved": 0.0}


@contextlib.contextmanager
def _prompt_gil():
    """A shorter GIL switch interval while early reads run. They run beside the skeleton's build, pure
    Python that holds the GIL; each of their steps (queue a copy, hand a slot back to a read) needs the
    GIL for microseconds, and waited up to the 5 ms default for it: 3.9 GB of copies then crawled at
    21 GB/s (BENCHMARKS.md, run 11). Process-wide; the first early reads to start save the interval,
    the last to end restore it."""
    with _SWITCH_LOCK:
        if _switch["active"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], EARLY_SWITCH_INTERVAL))
        _switch["active"] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            _switch["active"] -= 1
            if _switch["active"] == 0:
                sys.setswitchinterval(_switch["saved"])


#: Which engine streams the early reads: "rust" (the default: ``_fastq.Upload``, reads, copies and
#: events on a Rust thread that never takes the GIL) or "python" (``stream_to_device``'s loop on a
#: Python thread, as before run 15).
EARLY_ENGINE = os.environ.get("FASTQ_EARLY_ENGINE", "rust")

#: Tensors under this size are read early into shared device blocks (one allocation for a run of
#: neighbours), larger ones each into a buffer of their own.
SMALL_TENSOR = 1 << 20


class EarlyReads:
    """Checkpoint tensors streamed through the ring to ``device`` before anything knows which
    parameter each one fills: ``arrivals()`` hands them over in file order, each once it is on the
    device. ``cancel()`` stops the stream and drops what was not taken.

    With the "rust" engine (``EARLY_ENGINE``) every buffer is allocated here, at once, and a Rust
    thread (``_fastq.Upload``) reads, copies and recycles the ring's slots without the GIL, so the
    skeleton's build on the caller's thread runs beside it at full speed; a helper thread only waits
    for the ring to be pinned and starts it. With "python", ``stream_to_device`` runs on a thread of
    its own and hands buffers over as their copies are queued (work queued after a hand-over on the
    stream current here runs after the copies)."""

    def __init__(self, ckpt, device: torch.device, names: list[str], threads=None, timeline: Timeline | None = None):
        self.device = device
        self._timeline = timeline
        self._got: list[tuple[str, torch.Tensor]] = []
        self._taken = 0
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._upload = None
        self._ring = None
        self._rust = EARLY_ENGINE == "rust"
        self._order: list = []
        requests = [Request(n, n, ckpt.meta(n).nbytes, shared=True) for n in names]  # all kept as they are
        reserve_cached(device, device_bytes(requests))  # they all stay: one block, no tails
        if self._rust:
            self._order, blocks = _allocate(ckpt, names, device)
            target, args = self._run_rust, (ckpt, blocks, threads)
        else:
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None  # a CPU device: tests
            target, args = self._run, (ckpt, requests, stream, threads, timeline)
        self._thread = threading.Thread(target=target, args=args, daemon=True, name="fastq-early-reads")
        self._thread.start()

    def _run_rust(self, ckpt, blocks, threads) -> None:
        """Waits for the ring to be pinned, then starts the Rust upload of ``blocks`` (``_allocate``)."""
        cuda = self.device.type == "cuda"
        ring = ring_for() if cuda else PinnedRing(slot_bytes=1 << 20, pin=False)
        ring.lock.acquire()  # held until the upload has ended (``_end``)
        self._ring = ring
        try:
            ring.wait_all()
            if not self._stop.is_set():
                with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
                    stream = None
                    if cuda:
                        copy = copy_stream(self.device)
                        copy.wait_stream(torch.cuda.current_stream(self.device))
                        stream = copy.cuda_stream
                    self._upload = _fastq.Upload(ckpt.native, blocks, [ring.array(k) for k in range(len(ring))],
                                                 stream, threads)
        except BaseException as e:  # noqa: BLE001 - raised again where the tensors are taken
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _run(self, ckpt, requests, stream, threads, timeline) -> None:
        try:
            with _prompt_gil(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                stream_to_device(ckpt, requests, self.device, self._arrived, threads=threads, timeline=timeline,
                                 stop=self._stop)
        except BaseException as e:  # noqa: BLE001 - raised again where the tensors are taken
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _arrived(self, name: str, buf: torch.Tensor) -> None:
        with self._cond:
            self._got.append((name, buf))
            self._cond.notify_all()

    def arrivals(self):
        """Yields ``(tensor name, uint8 device buffer)`` as each lands, until all have; then raises what
        stopped the stream, if anything did."""
        if self._rust:
            yield from self._arrivals_rust()
            return
        while True:
            with self._cond:
                while self._taken == len(self._got) and not self._done:
                    self._cond.wait()
                if self._taken == len(self._got):
                    break
                item, self._got[self._taken] = self._got[self._taken], None
                self._taken += 1
            yield item
        if self._error is not None:
            raise self._error

    def _arrivals_rust(self):
        try:
            self._thread.join()  # the upload has started (or could not)
            if self._error is not None:
                raise self._error
            if self._upload is None:
                return  # cancelled before it started
            order, self._order = self._order, []
            for k, (request, name, buf) in enumerate(order):
                self._upload.wait(request + 1)  # GIL released; raises the upload's error
                order[k] = None
                yield name, buf
        finally:
            self._end()

    def _end(self) -> None:
        """After the Rust upload: its timeline recorded, the ring handed back, the buffers dropped."""
        if self._upload is not None:
            self._upload.cancel()  # returns at once when it has ended
            if self._timeline is not None:
                reads, copies = self._upload.timeline()
                self._timeline.reads.extend(reads)
                self._timeline.host_copies.extend(copies)
            self._upload = None
        self._order = []
        if self._ring is not None:
            self._ring, ring = None, self._ring
            ring.lock.release()

    def cancel(self) -> None:
        """Stops the stream (the reads in flight end first) and frees what was not taken."""
        self._stop.set()
        self._thread.join()
        if self._rust:
            self._end()
        with self._cond:
            self._got, self._taken = [], 0


def _allocate(ckpt, names: list[str], device: torch.device):
    """Device buffers for ``names`` (file order): a tensor of ``SMALL_TENSOR`` bytes or more gets one of
    its own, a run of smaller neighbours one block (up to a ring slot) whose views they are. Returns the
    hand-over order ``(request index, name, uint8 buffer)`` and the upload's requests ``(device address,
    bytes, pieces)``."""
    order, blocks, run = [], [], []

    def close() -> None:
        if not run:
            return
        size = run[-1][1] + run[-1][2]
        block = torch.empty(size, dtype=torch.uint8, device=device)
        pieces = []
        for name, at, n in run:
            order.append((len(blocks), name, block[at : at + n]))
            pieces.append((name, 0, n, at))
        blocks.append((block.data_ptr(), size, pieces))
        run.clear()

    for name in names:
        n = ckpt.meta(name).nbytes
        if n >= SMALL_TENSOR or n == 0:
            close()
            buf = torch.empty(n, dtype=torch.uint8, device=device)
            order.append((len(blocks), name, buf))
            blocks.append((buf.data_ptr(), n, [(name, 0, n, 0)] if n else []))
            continue
        at = -(-(run[-1][1] + run[-1][2]) // ALIGN) * ALIGN if run else 0
        if at + n > SLOT_BYTES:
            close()
            at = 0
        run.append((name, at, n))
    close()
    return order, blocks


def start_early_reads(ckpt, device_map, dtype: torch.dtype, threads=None, timeline: Timeline | None = None,
                      prequantized: bool = False):
    """``EarlyReads`` of ``early_names`` when ``device_map`` sends everything to one GPU and
    ``EARLY_READS`` allows it for this kind of checkpoint; else None."""
    wanted = EARLY_READS not in (False, "0") and (EARLY_READS != "plain" or not prequantized)
    dev = cuda_device(dmap_mod.single_device(device_map))
    names = early_names(ckpt, dtype, prequantized) if wanted and dev is not None else None
    return EarlyReads(ckpt, dev, names, threads, timeline) if names else None


def early_names(ckpt, dtype: torch.dtype, prequantized: bool = False) -> list[str] | None:
    """The tensors to read early, in file order. Unquantized: every one, or None when a stored float
    tensor would be cast to ``dtype`` (it would be held twice until the plan is made). Pre-quantized:
    every one but the ``QuantState`` JSONs and int8 layout markers (read on the host) and the float
    tensors other than quantization statistics that would be cast (read after the plan)."""
    names = list(ckpt)
    if not prequantized:
        if any(ckpt.meta(n).torch_dtype.is_floating_point and ckpt.meta(n).torch_dtype != dtype for n in names):
            return None
        return names
    stats = (*QUANT_STATE_SUFFIXES, SCB)
    out = []
    for n in names:
        last, dt = n.rpartition(".")[2], ckpt.meta(n).torch_dtype
        if quant_state_owner(n) is not None or last == WEIGHT_FORMAT:
            continue
        if dt.is_floating_point and dt != dtype and last not in stats:
            continue
        out.append(n)
    return out


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
        early: the tensors already streaming to their GPU (``start_early_reads``), taken first.

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
