"""Copies to a GPU straight from the page cache.

A warm checkpoint is already in memory, in the kernel's page cache. The ring (transfer.py) reads it a
second time, with 16 threads into pinned slots (34-44 GB/s on the H200 machine), before the DMA engine
copies it. Here each shard is mapped read-only and shared, the pages that hold its large tensors are
pinned where they are (``cudaHostRegister`` with ``cudaHostRegisterReadOnly``, chunk by chunk), and the
DMA engine copies each tensor from there: no host copy, the bus's 55 GB/s (benches/gpu/probe.py
mapreg, BENCHMARKS.md run 13). It runs on a thread of its own from the moment the checkpoint is opened,
while the skeleton is built: pinning happens in the driver with the GIL released, and the thread's
Python is a few steps per tensor (the ring's loop, a few per 64 MiB and per small tensor, fought the
skeleton for the GIL: runs 11-13). Device buffers are handed over as the ring's early reads hand theirs
(``transfer.Arrivals``).

Where it is used, and why only there:
- the mapping is shared and read-only. A long-term pin of a private writable mapping (the one the Rust
  core reads through, memmap2's ``map_copy``) makes Linux copy every page first: run 13's 7B reload
  never came back;
- the pages are resident (``mincore``): pinning a cold file faults it in page by page on one thread,
  where the ring's 16 preads read the disk in parallel. A shard that is not wholly in the page cache
  takes the ring;
- tensors of ``MIN_BYTES`` or more; the small ones (statistics, norms) take the ring after the plan;
- where the driver refuses to pin (a file system it cannot pin), the thread stops and what it did not
  bring takes the ring too.
The pages are unpinned once their copies are done, on a thread of its own after the fill (``release``).
``FASTQ_PAGE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .transfer import ALIGN, Arrivals, Timeline, reserve_cached

__all__ = ["CHUNK_BYTES", "ENABLED", "MIN_BYTES", "PageCacheReads", "resident_fraction"]

log = logging.getLogger(__name__)

#: Copy straight from the page cache ("1", the default) or always through the ring ("0").
ENABLED = os.environ.get("FASTQ_PAGE_CACHE", "1") != "0"
#: Tensors of this size or more are copied from the page cache; the rest take the ring.
MIN_BYTES = 1 << 20
#: Bytes pinned per ``cudaHostRegister`` call: the probe pinned 33 / 46 / 53 GB/s in chunks of
#: 64 / 256 / 1024 MiB; a tensor's copies start once the chunks that hold it are pinned.
CHUNK_BYTES = int(os.environ.get("FASTQ_PAGE_CACHE_CHUNK_MIB", "256")) << 20
#: Threads pinning chunks at once, ahead of the copies: one pinned 256 MiB chunks at 21 GB/s on the
#: H100 machine, with gaps where it waited for the GIL (BENCHMARKS.md, run 14).
THREADS = max(1, int(os.environ.get("FASTQ_PAGE_CACHE_THREADS", "4")))
#: ``cudaHostRegisterReadOnly``: the device only reads the pages (the mapping is read-only).
_READ_ONLY = 8
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def resident_fraction(address: int, length: int) -> float:
    """The share of the pages of ``address .. address + length`` (a mapping of a file) that are in the
    page cache, by ``mincore``; 0.0 where the kernel does not say."""
    start = address - address % _PAGE
    pages = -(-(address + length - start) // _PAGE)
    if pages == 0:
        return 1.0
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * _PAGE), vec) != 0:
        return 0.0
    return float(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) / pages


class _Cuda:
    """The driver calls, through torch's own bindings (each releases the GIL)."""

    @staticmethod
    def register(address: int, nbytes: int) -> bool:
        return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _READ_ONLY)) == 0

    @staticmethod
    def unregister(address: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(address)


class _Shard:
    """One shard mapped read-only and shared, as a uint8 CPU tensor over the mapping (for copies only:
    the pages are read-only), with the chunks of it that are pinned."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # MAP_SHARED, the default
        self.view = np.frombuffer(self.map, dtype=np.uint8)  # holds the mapping open while it lives
        self.address = self.view.ctypes.data
        # A writable ctypes array over the same pages: torch.from_numpy warns on a read-only array, and
        # nothing writes through this one (the device reads the pages, the host never touches them).
        raw = (ctypes.c_ubyte * len(self.view)).from_address(self.address)
        self.tensor = torch.from_numpy(np.ctypeslib.as_array(raw))
        self.pinned: list[int] = []  # addresses of the registered chunks

    def close(self) -> None:
        """Drops the views; the mapping goes with the last reference (a buffer still exported by a view
        somebody holds keeps it, as it must)."""
        self.tensor = self.view = self.map = None


class PageCacheReads(Arrivals):
    """The large tensors of ``names`` copied to ``device`` straight from the page cache by a thread of
    their own (module docstring); ``arrivals()`` hands them over as they are queued. Copies run on the
    stream that was current where this was made, so work queued there after a hand-over runs after
    them. Tensors it does not bring (a shard not resident, a refused pin, a stop) are simply not handed
    over: the caller reads them through the ring. ``cancel()`` (also the end of a load) stops the thread
    and unpins the pages once their copies are done, in the background.

    Args:
        ckpt: the opened checkpoint.
        device: the GPU (a CPU device runs the same steps with synchronous copies: tests).
        names: the tensors wanted; those under ``MIN_BYTES`` are left to the ring.
        timeline: where to record the copies (``transfer.Timeline``).
        driver: the pin / unpin calls (tests give a CPU stand-in).
        chunk_bytes: bytes per pin call.
    """

    def __init__(self, ckpt, device: torch.device, names, timeline: Timeline | None = None, driver=_Cuda,
                 chunk_bytes: int = CHUNK_BYTES):
        self.device = device
        self._driver = driver
        self._shards: list[_Shard] = []
        self._last: torch.cuda.Event | None = None
        self.released: threading.Thread | None = None  # unpins the pages after cancel()
        by_file: dict[str, list[tuple[int, int, str]]] = {}
        for n in names:
            m = ckpt.meta(n)
            if m.nbytes >= MIN_BYTES:
                by_file.setdefault(m.file, []).append((ckpt.offset(n), m.nbytes, n))
        self.names = {n for ts in by_file.values() for *_, n in ts}
        reserve_cached(device, sum(-(-nb // ALIGN) * ALIGN for ts in by_file.values() for _, nb, _ in ts))
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if stream is not None and timeline is not None and timeline.base is None:
            timeline.base = _event(True)  # the ring's copies and these on one clock
            timeline.base_time = time.time()
        work = [(path, sorted(ts)) for path, ts in by_file.items()]
        self.start(lambda arrived, stop: self._bring(work, stream, chunk_bytes, arrived, stop, timeline),
                   "fastq-page-cache")

    def _bring(self, work, stream, chunk_bytes: int, arrived: Callable, stop: threading.Event,
               timeline: Timeline | None) -> None:
        cuda = stream is not None
        with torch.cuda.device(self.device) if cuda else _null(), torch.cuda.stream(stream) if cuda else _null():
            start = _event(timeline is not None) if cuda else None
            nbytes = 0
            for path, tensors in work:
                if stop.is_set():
                    return
                shard = _Shard(path)
                self._shards.append(shard)
                # whole pages: the mapping's last one runs past the end of the file, and is mapped
                lo = tensors[0][0] - tensors[0][0] % _PAGE
                hi = -(-(tensors[-1][0] + tensors[-1][1]) // _PAGE) * _PAGE
                if resident_fraction(shard.address + lo, hi - lo) < 1.0:
                    log.debug("%s: not all in the page cache, read through the ring", path)
                    continue
                nbytes += self._copy_shard(shard, tensors, lo, hi, chunk_bytes, arrived, stop, timeline)
            if cuda:
                self._last = _event(timeline is not None)
                if timeline is not None and nbytes:
                    timeline.copies.append((start, self._last, nbytes))

    def _copy_shard(self, shard: _Shard, tensors, lo: int, hi: int, chunk_bytes: int, arrived, stop,
                    timeline: Timeline | None) -> int:
        """Pins ``lo .. hi`` of ``shard`` chunk by chunk and queues each tensor's copy, piece by piece
        within the pinned chunks (a copy never spans two pinned ranges), handing each over once its last
        piece is queued; returns the bytes copied. The pinning is the timeline's "read" stage here."""
        chunks = [(a, min(a + chunk_bytes, hi)) for a in range(lo, hi, chunk_bytes)]

        def pin(a: int, b: int) -> bool:
            if stop.is_set():
                return False
            t = time.time()
            if not self._driver.register(shard.address + a, b - a):
                return False
            shard.pinned.append(shard.address + a)
            if timeline is not None:
                timeline.reads.append((t, time.time(), b - a))
            return True

        # THREADS pin ahead; this thread copies chunk by chunk in file order as each is pinned. Leaving the
        # pool waits for the pins under way (those not started are cancelled), so every pinned chunk is in
        # shard.pinned before the pages can be released.
        with ThreadPoolExecutor(min(THREADS, len(chunks)), thread_name_prefix="fastq-pin") as pool:
            pins = [pool.submit(pin, a, b) for a, b in chunks]
            try:
                return self._copy_chunks(shard, tensors, chunks, pins, arrived, stop)
            finally:
                for p in pins:
                    p.cancel()

    def _copy_chunks(self, shard: _Shard, tensors, chunks, pins, arrived, stop) -> int:
        k, copied, bufs = 0, 0, {}
        for (a, b), pinned in zip(chunks, pins, strict=True):
            if not pinned.result():
                if not stop.is_set():
                    log.debug("%s: the driver refused to pin it, read through the ring", shard.path)
                return copied
            while k < len(tensors) and tensors[k][0] < b:
                off, n, name = tensors[k]
                if name not in bufs:
                    bufs[name] = torch.empty(n, dtype=torch.uint8, device=self.device)
                s, e = max(off, a), min(off + n, b)
                bufs[name][s - off : e - off].copy_(shard.tensor[s:e], non_blocking=True)
                copied += e - s
                if off + n > b:
                    break  # the rest of it lies in the next chunk
                arrived(name, bufs.pop(name))
                k += 1
        return copied

    def cancel(self) -> None:
        """Stops the thread, drops what was not taken, and unpins the pages once the copies out of them
        are done (on a thread of its own: unpinning 13.5 GB took 0.11-0.14 s on the H200 machine)."""
        super().cancel()
        shards, self._shards, last = self._shards, [], self._last
        if shards:
            self.released = threading.Thread(target=_release, args=(shards, last, self._driver), daemon=True,
                                             name="fastq-page-cache-release")
            _RELEASING.add(self.released)
            self.released.start()


#: Unpinning threads still running. The interpreter's exit waits for them: a process that ended while one
#: was inside the driver was aborted ("terminate called without an active exception", run 14).
_RELEASING: set[threading.Thread] = set()


@atexit.register
def _wait_for_releases() -> None:
    for t in list(_RELEASING):
        t.join()


def _release(shards: list[_Shard], last, driver) -> None:
    try:
        if last is not None:
            last.synchronize()
        for shard in shards:
            for address in shard.pinned:
                driver.unregister(address)
            shard.pinned = []
            shard.close()
    except Exception:  # the pages stay pinned until the process ends; the model is whole
        log.debug("unpinning the page cache failed", exc_info=True)
    finally:
        _RELEASING.discard(threading.current_thread())


def _event(timing: bool) -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=timing)
    ev.record()
    return ev


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
