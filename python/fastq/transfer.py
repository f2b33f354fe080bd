"""Host-to-device transfer: checkpoint bytes read by Rust workers straight into a ring of pinned
buffers, copied to the GPU asynchronously, one buffer filling while the previous ones are in flight.

    reader threads (Rust, pread)  ->  pinned slot k  ->  copy on the stream (DMA)  ->  device buffer
                                                                          -> quantize there / install

The ring has a few slots of pinned memory, allocated once per process and reused; a CUDA event per
slot says when the copy out of it finished, so the slot can be refilled. The copies run on their own
stream, so the DMA engine fills the next buffers while the caller's stream quantizes the previous
ones (on one stream the two took turns: BENCHMARKS.md, run 10). No torch thread pool runs in the hot
path (the DMA engine copies, the Rust pool reads), and nothing is copied through pageable memory.
``stream_to_device`` is the engine; ``Timeline`` records when each stage ran.

Why the checkpoint is read into the ring rather than copied from the page cache where it lies: pinning
the cached pages in place (``cudaHostRegister`` of a read-only shared mapping, 21-43 GB/s with one to
eight threads) and copying from them (55 GB/s) take turns - the copies wait for the pinning - while
the ring's reads and copies overlap; a pre-quantized reload was no faster that way and a plain load
slower (BENCHMARKS.md run 14, commit d4c91d5).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import _fastq

__all__ = [
    "ALIGN", "LAST_TIMELINE", "PinnedRing", "Request", "Timeline", "aligned", "copy_stream", "device_bytes",
    "prefetch_ring", "reserve_cached", "ring_for", "stream_to_device", "to_device",
]

#: Bytes per slot and slots in the ring: 4 x 64 MiB, three reads queued while the fourth slot is
#: copied. 8 slots were slower on the H200 (7B NF4 0.88 s against 0.67 s: pinning 512 MiB while the
#: skeleton is built doubled that phase); BENCHMARKS.md, GPU. ``FASTQ_RING_SLOTS`` and
#: ``FASTQ_RING_SLOT_MIB`` override them (benches/gpu/probe.py measures the choices).


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment; ``default`` when unset or not one."""
    try:
        v = int(os.environ.get(name, default))
    except ValueError:
        return default
    return v if v > 0 else default


SLOT_BYTES = _env_int("FASTQ_RING_SLOT_MIB", 64) << 20
SLOTS = _env_int("FASTQ_RING_SLOTS", 4)

#: Copies on a stream of their own ("1", the default) or on the caller's stream ("0", as before run 10).
COPY_STREAM = os.environ.get("FASTQ_COPY_STREAM", "1") != "0"
_STREAMS: dict[int, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the ring's copies run on, one per device and process, made on first use."""
    with _RING_LOCK:
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(device)
        return _STREAMS[key]


def reserve_cached(device: torch.device, nbytes: int) -> None:
    """Leaves one free block of ``nbytes`` in the caching allocator of ``device``, so that the buffers
    that stay after a load are carved out of it. Each in a fresh segment of its own, a buffer would keep
    the tail of the segment's 2 MiB rounding when that tail is under 1 MiB (the allocator splits off only
    larger ones): 0.5 MiB for each 21.5 MiB MLP weight of a 7B NF4 model, 48 MiB in all (BENCHMARKS.md,
    runs 10-11)."""
    if device.type == "cuda" and nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device=device)  # freed at once: the block stays cached


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (a plain copy; the bulk of a GPU load goes through ``stream_to_device``)."""
    return t if t.device == device else t.to(device)


#: How the ring's host memory is pinned: "register" (pageable memory, its pages faulted in by torch's
#: threads, then ``cudaHostRegister``) or "alloc" (``torch.empty(pin_memory=True)``, ``cudaHostAlloc``).
#: On the H200 machine 4 x 64 MiB took 0.036 s registered, 0.116 s allocated (one thread per slot) and
#: 0.087 s allocated one slot after the other (BENCHMARKS.md, run 7; copies from either run at 54 GB/s).
#: ``FASTQ_RING_PIN`` chooses; benches/gpu/probe.py ``pin`` measures the ways.
PIN_METHOD = os.environ.get("FASTQ_RING_PIN", "register")


def _pinned(nbytes: int, method: str) -> torch.Tensor:
    """``nbytes`` of page-locked host memory, by ``method`` (``PIN_METHOD``); "register" falls back to
    "alloc" where the driver refuses to register."""
    if method == "register":
        t = torch.empty(nbytes, dtype=torch.uint8)
        t.zero_()  # every page faulted in now, by torch's threads, so registering only locks them
        if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)) == 0:
            return t
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedRing:
    """``slots`` pinned host buffers of ``slot_bytes`` each, with the event of the last copy out of each.

    The slots are pinned by background threads, all at once (torch releases the GIL while it pins);
    ``buffer(k)`` and ``array(k)`` wait for slot ``k`` only, so the first read starts as soon as the
    first slot is ready rather than when the whole ring is."""

    def __init__(self, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS, pin: bool = True, method: str | None = None):
        self.slot_bytes = slot_bytes
        self.lock = threading.Lock()  # held by the one stream_to_device using the ring
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._errors: list[BaseException | None] = [None] * slots
        self._ready = [threading.Event() for _ in range(slots)]
        method = method or PIN_METHOD
        for k in range(slots):
            if pin:
                threading.Thread(target=self._make, args=(k, method), daemon=True, name=f"fastq-pin-{k}").start()
            else:
                self._make(k, None)

    def _make(self, k: int, method: str | None) -> None:
        try:
            self._buffers[k] = _pinned(self.slot_bytes, method) if method else torch.empty(self.slot_bytes, dtype=torch.uint8)
        except Exception as e:  # noqa: BLE001 - re-raised where the slot is used
            self._errors[k] = e
        finally:
            self._ready[k].set()

    def _wait(self, k: int) -> None:
        self._ready[k].wait()
        if self._errors[k] is not None:
            raise self._errors[k]

    def buffer(self, k: int) -> torch.Tensor:
        """Slot ``k`` as a uint8 tensor (waits until it is pinned)."""
        self._wait(k)
        return self._buffers[k]

    def array(self, k: int):
        """Slot ``k`` as a writable numpy array for the Rust readers (waits until it is pinned)."""
        return self.buffer(k).numpy()

    def wait_all(self) -> None:
        """Returns once every slot is pinned."""
        for k in range(len(self)):
            self._wait(k)

    def __len__(self) -> int:
        return len(self._buffers)


_RING: PinnedRing | None = None
_RING_LOCK = threading.Lock()


def ring_for() -> PinnedRing:
    """The process's ring, made on first use; its slots are pinned in the background (``prefetch_ring``
    starts that before the model skeleton is built)."""
    global _RING
    with _RING_LOCK:
        if _RING is None:
            _RING = PinnedRing()
        return _RING


def prefetch_ring() -> PinnedRing:
    """The process's ring, its slots being pinned in the background while the caller goes on."""
    return ring_for()


#: Where each request starts in a slot, and so in a device block that several share: cudaMalloc's own
#: alignment, so a tensor carved out of a shared block is aligned as one allocated alone.
ALIGN = 256


#: Shared requests next to each other in a slot share one device block ("1", the default) or each get
#: a buffer of their own ("0", as before run 12).
SHARED_BLOCKS = os.environ.get("FASTQ_SHARED_BLOCKS", "1") != "0"


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGN``: where the next request starts in a slot or block."""
    return -(-n // ALIGN) * ALIGN


@dataclass
class Request:
    """A tensor whose bytes go to one fresh device buffer; ``key`` is handed back with the buffer.
    With ``pieces`` (``(tensor, offset, nbytes)`` each, covering the buffer), the buffer is assembled
    from several checkpoint tensors (fused MoE experts) and ``tensor`` is unused. ``shared``: the
    buffer is kept as it is (it becomes a parameter or statistic), so it may be a view of one device
    block that the shared requests next to it in the same slot share - one allocation and one copy for
    all of them rather than one each (a pre-quantized 7B checkpoint is ~1,600 tensors, most of them
    statistics of a few KiB; BENCHMARKS.md, run 12). A buffer that is quantized or cast and then
    dropped must not be shared: its block would stay allocated as long as its neighbours live."""

    key: object
    tensor: str
    nbytes: int
    pieces: tuple[tuple[str, int, int], ...] = ()
    shared: bool = False

    def reads(self, off: int, n: int, at: int):
        """The reads ``(tensor, tensor offset, len, slot offset)`` that bring bytes ``off..off+n`` of the
        buffer to ``at`` in a slot."""
        if not self.pieces:
            return [(self.tensor, off, n, at)]
        out = []
        for name, start, size in self.pieces:
            a, b = max(off, start), min(off + n, start + size)
            if a < b:
                out.append((name, a - start, b - a, at + a - off))
        return out


@dataclass
class Timeline:
    """When each stage ran: reads (host clock), copies and device work (CUDA events; the Rust upload's
    copies on the host clock, from queued to seen finished), in seconds from ``t0``. ``summary()`` gives
    busy time and bytes per stage."""

    t0: float = field(default_factory=time.time)
    reads: list[tuple[float, float, int]] = field(default_factory=list)
    copies: list[tuple[object, object, int]] = field(default_factory=list)
    host_copies: list[tuple[float, float, int]] = field(default_factory=list)
    work: list[tuple[object, object]] = field(default_factory=list)
    base: object | None = None
    base_time: float = 0.0
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, phase: str) -> None:
        """Records that ``phase`` of the load ended now (host clock)."""
        self.marks.append((phase, time.time()))

    def phases(self) -> dict[str, float]:
        """Seconds spent in each marked phase (from the previous mark, the first from ``t0``)."""
        out, last = {}, self.t0
        for name, t in self.marks:
            out[name] = out.get(name, 0.0) + t - last
            last = t
        return out

    def spans(self) -> dict[str, list[tuple[float, float]]]:
        """Every span per stage, in seconds from ``t0`` (device events are synchronized first)."""
        out: dict[str, list[tuple[float, float]]] = {"read": [(a - self.t0, b - self.t0) for a, b, _ in self.reads]}
        if self.host_copies:
            out["copy"] = [(a - self.t0, b - self.t0) for a, b, _ in self.host_copies]
        if self.base is not None:
            self.base.synchronize()
            off = self.base_time - self.t0

            def rel(ev) -> float:
                return off + self.base.elapsed_time(ev) / 1e3

            out["copy"] = out.get("copy", []) + [(rel(a), rel(b)) for a, b, _ in self.copies]
            out["device"] = [(rel(a), rel(b)) for a, b in self.work]
        return out

    def summary(self) -> dict:
        """Per stage: first start, last end, busy seconds (union of spans), bytes and GB/s over busy time."""
        res = {}
        nbytes = {"read": sum(n for *_, n in self.reads),
                  "copy": sum(n for *_, n in self.copies) + sum(n for *_, n in self.host_copies)}
        for stage, spans in self.spans().items():
            if not spans:
                continue
            busy, end = 0.0, -1e30
            for a, b in sorted(spans):
                a = max(a, end)
                if b > a:
                    busy += b - a
                end = max(end, b)
            d = {"start": min(a for a, _ in spans), "end": max(b for _, b in spans), "busy_s": busy}
            if stage in nbytes:
                d["GB"] = nbytes[stage] / 1e9
                d["GBps"] = nbytes[stage] / busy / 1e9 if busy > 0 else 0.0
            res[stage] = d
        return res


class _Last:
    """The timeline of the last GPU fill in this process (benches/gpu reads it)."""

    timeline: Timeline | None = None

    def reset(self) -> Timeline:
        self.timeline = Timeline()
        return self.timeline


LAST_TIMELINE = _Last()


def device_bytes(requests: Iterable[Request]) -> int:
    """Device bytes the requests' buffers take, each rounded up to ``ALIGN`` as in a shared block."""
    return sum(aligned(r.nbytes) for r in requests)


def _batches(requests: list[Request], slot_bytes: int):
    """Splits the requests into slot-sized batches of pieces ``(request index, offset, len, slot offset)``;
    a tensor larger than a slot spans several batches. Each request starts at a multiple of ``ALIGN``."""
    batch, used = [], 0
    for i, r in enumerate(requests):
        used = min(aligned(used), slot_bytes)
        if r.nbytes == 0:
            batch.append((i, 0, 0, used))
            continue
        off = 0
        while off < r.nbytes:
            if used == slot_bytes:
                yield batch
                batch, used = [], 0
            n = min(r.nbytes - off, slot_bytes - used)
            batch.append((i, off, n, used))
            used += n
            off += n
    if batch:
        yield batch


def stream_to_device(
    ckpt,
    requests: Iterable[Request],
    device: torch.device,
    on_ready: Callable[[object, torch.Tensor], None],
    *,
    threads: int | None = None,
    ring: PinnedRing | None = None,
    timeline: Timeline | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Moves the bytes of every request to ``device``, in order; calls ``on_ready(key, buffer)`` with a
    uint8 device tensor of the request's bytes as soon as its copies are queued (work the callback
    queues on the current stream runs after them). Returns when every copy is queued, or early when
    ``stop`` is set (checked before each batch); the caller synchronizes before handing the results to
    a user. Whichever way it ends, an error included, no read is left writing into the ring.

    Stream order: the copies run on a stream of their own; the current stream waits for a batch's
    copies before the callbacks of the requests it completed. A buffer is allocated on the current
    stream one batch ahead of its copies, and the copy stream waits for the current stream as it was
    then, so a block the allocator hands back is never written while earlier work still reads it.

    The callbacks run on the loop's thread: with the loop on a thread of its own and the callbacks on the
    caller's, the loop waited for the GIL and the loads were slower (BENCHMARKS.md, run 13)."""
    requests = list(requests)
    if not requests:
        return
    cuda = device.type == "cuda"  # a CPU "device" runs the same steps synchronously (tests)
    ring = ring or (ring_for() if cuda else PinnedRing(slot_bytes=1 << 20, pin=False))
    reader = _fastq.Reader(ckpt.native, threads)
    compute = torch.cuda.current_stream(device) if cuda else None
    copy = (copy_stream(device) if COPY_STREAM else compute) if cuda else None
    if not cuda:
        timeline = None
    if timeline is not None and timeline.base is None:
        timeline.base = torch.cuda.Event(enable_timing=True)
        timeline.base.record(compute)
        timeline.base_time = time.time()
    batches = list(_batches(requests, ring.slot_bytes))
    buffers: dict[int, torch.Tensor] = {}
    blocks: dict[int, tuple[list, set]] = {}  # batch -> (shared blocks (block, slot start, end), their requests)
    remaining = [r.nbytes for r in requests]
    tickets: deque = deque()

    def event(stream, timing: bool = False):
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(stream)
        return ev

    def allocate(j: int):
        """Device buffers for the requests batch ``j`` starts (runs of whole shared requests next to each
        other in the slot: views of one block); the event the copy stream waits for."""
        made, covered, run = [], set(), []

        def close_run() -> None:
            if len(run) > 1:
                start, end = run[0][1], run[-1][1] + run[-1][2]
                block = torch.empty(end - start, dtype=torch.uint8, device=device)
                for i, at, n in run:
                    buffers[i] = block[at - start : at - start + n]
                    covered.add(i)
                made.append((block, start, end))
            elif run:
                buffers[run[0][0]] = torch.empty(run[0][2], dtype=torch.uint8, device=device)
            run.clear()

        new = False
        for i, off, n, at in batches[j]:
            if i in buffers:  # the rest of a request an earlier batch started
                close_run()
                continue
            new = True
            if SHARED_BLOCKS and requests[i].shared and off == 0 and 0 < n == requests[i].nbytes:
                run.append((i, at, n))
            else:
                close_run()
                buffers[i] = torch.empty(requests[i].nbytes, dtype=torch.uint8, device=device)
        close_run()
        blocks[j] = (made, covered)
        return event(compute) if new and cuda and copy is not compute else None

    def submit(k: int) -> None:
        slot = k % len(ring)
        ev = ring.events[slot]
        if ev is not None:
            ev.synchronize()  # the copy out of this slot has finished (GIL released by torch)
        pieces = [p for i, off, n, at in batches[k] for p in requests[i].reads(off, n, at)]
        tickets.append(reader.submit(pieces, ring.array(slot)))

    ahead = len(ring) - 1
    ring.lock.acquire()  # two loads at once (threads) take turns with the process's ring
    try:
        for k in range(min(ahead, len(batches))):
            submit(k)
        allocated = allocate(0)
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            for j, batch in enumerate(batches):
                if stop is not None and stop.is_set():
                    break
                ticket = tickets.popleft()
                ticket.wait()
                slot = j % len(ring)
                host = ring.buffer(slot)
                if timeline is not None:
                    a, b = ticket.times()
                    timeline.reads.append((a, b, sum(n for _, _, n, _ in batch)))
                finished = []
                with torch.cuda.stream(copy) if cuda else contextlib.nullcontext():
                    if allocated is not None:
                        copy.wait_event(allocated)
                    start = event(copy, True) if timeline is not None else None
                    made, covered = blocks.pop(j)
                    for block, a, b in made:
                        block.copy_(host[a:b], non_blocking=True)
                    for i, off, n, at in batch:
                        if n and i not in covered:
                            buffers[i][off : off + n].copy_(host[at : at + n], non_blocking=True)
                        remaining[i] -= n
                        if remaining[i] == 0:
                            finished.append(i)
                    ev = event(copy, timeline is not None) if cuda else None
                ring.events[slot] = ev
                if timeline is not None:
                    timeline.copies.append((start, ev, sum(n for _, _, n, _ in batch)))
                if j + ahead < len(batches):
                    submit(j + ahead)
                # the next batch's buffers, before this batch's callbacks queue work that frees blocks
                allocated = allocate(j + 1) if j + 1 < len(batches) else None
                if not finished:
                    continue
                if cuda and copy is not compute:
                    compute.wait_event(ev)
                w0 = event(compute, True) if timeline is not None else None
                for i in finished:
                    on_ready(requests[i].key, buffers.pop(i))
                if timeline is not None:
                    timeline.work.append((w0, event(compute, True)))
    finally:
        for ticket in tickets:  # reads still writing into ring slots (after an error or a stop): let them end
            with contextlib.suppress(Exception):
                ticket.wait()
        if cuda and copy is not compute:
            compute.wait_stream(copy)
        ring.lock.release()
