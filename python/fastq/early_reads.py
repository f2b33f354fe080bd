"""Early reads: a checkpoint bound whole for one GPU streamed there while transformers builds the model
skeleton, before any plan says which parameter each tensor fills. Unquantized and pre-quantized
checkpoints qualify - their tensors are kept as read - and the fill (device_fill.py) takes each one as it
lands.

The stream runs whole in Rust (``_fastq.Upload``, rust/core/upload.rs): reads into the pinned ring,
copies on the driver's stream, slots recycled on its events, on a thread that never takes the GIL. The
same loop in Python (``transfer.stream_to_device`` on a thread, until run 15) fought the skeleton's build
for the GIL - a pre-quantized checkpoint's ~1,400 small statistics tensors most - and was slower on the
GPU (BENCHMARKS.md runs 11-13, 15).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import _fastq
from . import device_map as dmap_mod
from .bnb_format import QUANT_STATE_SUFFIXES, SCB, WEIGHT_FORMAT, quant_state_owner
from .transfer import (
    SLOT_BYTES,
    PinnedRing,
    Request,
    Timeline,
    aligned,
    copy_stream,
    device_bytes,
    reserve_cached,
    ring_for,
)

__all__ = ["EARLY_READS", "EarlyReads", "early_names", "start_early_reads"]

#: Stream a checkpoint bound whole for one GPU there while the skeleton is built: unquantized and
#: pre-quantized ("1", the default), unquantized only ("plain", as before run 15), or neither ("0":
#: every tensor read once the plan is made).
EARLY_READS = os.environ.get("FASTQ_EARLY_READS", "1")


#: Tensors under this size are read early into shared device blocks (one allocation for a run of
#: neighbours), larger ones each into a buffer of their own.
SMALL_TENSOR = 1 << 20


class EarlyReads:
    """Checkpoint tensors streamed through the ring to ``device`` before anything knows which
    parameter each one fills: ``arrivals()`` hands them over in file order, each once it is on the
    device. ``cancel()`` stops the stream and drops what was not taken.

    Every buffer is allocated here, at once, and a Rust thread (``_fastq.Upload``) reads, copies and
    recycles the ring's slots without the GIL, so the skeleton's build on the caller's thread runs
    beside it at full speed; a helper thread only waits for the ring to be pinned and starts it."""

    def __init__(self, ckpt, device: torch.device, names: list[str], threads=None, timeline: Timeline | None = None):
        self.device = device
        self._timeline = timeline
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._upload = None
        self._ring = None
        requests = [Request(n, n, ckpt.meta(n).nbytes, shared=True) for n in names]  # all kept as they are
        reserve_cached(device, device_bytes(requests))  # they all stay: one block, no tails
        # The caller's stream (torch's current stream is per thread): the buffers are allocated on it here.
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None  # a CPU device: tests
        self._order, blocks = _allocate(ckpt, names, device)
        self._thread = threading.Thread(target=self._start, args=(ckpt, blocks, stream, threads), daemon=True,
                                        name="fastq-early-reads")
        self._thread.start()

    def _start(self, ckpt, blocks, caller, threads) -> None:
        """Waits for the ring to be pinned, then starts the Rust upload of ``blocks`` (``_allocate``) on
        the copy stream, after what the caller's stream ``caller`` holds now."""
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
                        copy.wait_stream(caller)
                        stream = copy.cuda_stream
                    self._upload = _fastq.Upload(ckpt.native, blocks, [ring.array(k) for k in range(len(ring))],
                                                 stream, threads)
        except BaseException as e:  # noqa: BLE001 - raised again where the tensors are taken
            self._error = e

    def arrivals(self):
        """Yields ``(tensor name, uint8 device buffer)`` as each lands, until all have; raises what
        stopped the stream, if anything did."""
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
        self._end()


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
        at = aligned(run[-1][1] + run[-1][2]) if run else 0
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
    dev = dmap_mod.cuda_device(dmap_mod.single_device(device_map))
    names = early_names(ckpt, dtype, prequantized) if wanted and dev is not None else None
    if threads is None:
        threads = _env_threads()
    return EarlyReads(ckpt, dev, names, threads, timeline) if names else None


def _env_threads() -> int | None:
    """``FASTQ_EARLY_THREADS``: reader threads for the early reads alone (they run beside the skeleton's
    build, which needs a core of its own); unset: those of the load (``FASTQ_NUM_THREADS`` or every core)."""
    try:
        n = int(os.environ.get("FASTQ_EARLY_THREADS", "0"))
    except ValueError:
        return None
    return n if n > 0 else None


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
