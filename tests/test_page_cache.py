"""Copies straight from the page cache (fastq/page_cache.py) on the CPU: the shards mapped read-only and
shared, pinned chunk by chunk (a stand-in driver here, which checks what the real one requires), every
large tensor handed over with its bytes; a refused pin or a shard not in the page cache leaves the rest to
the ring, and the fill still places every tensor. The CUDA half is tests/test_gpu.py."""

from __future__ import annotations

import itertools
import mmap
import threading

import fastq
import pytest
import torch
from fastq import device_fill, page_cache
from fastq.loader import prepare
from fastq.page_cache import PageCacheReads, resident_fraction
from safetensors.torch import save_file

PAGE = mmap.PAGESIZE


class Driver:
    """Pins nothing, but holds the calls to what cudaHostRegister / cudaHostUnregister require: page-aligned
    ranges inside a live mapping, never one pinned twice, each unpinned once. ``refuse_after``: the pin
    calls after that many are refused (a file system the driver cannot pin); with one pinning thread
    (``page_cache.THREADS``) the chunks pinned are then the first ``refuse_after``."""

    def __init__(self, refuse_after: int | None = None):
        self.pinned: dict[int, int] = {}
        self.calls = 0
        self.unpinned: list[int] = []
        self.refuse_after = refuse_after
        self.lock = threading.Lock()

    def register(self, address: int, nbytes: int) -> bool:
        with self.lock:  # the pinning threads call at once
            self.calls += 1
            if self.refuse_after is not None and self.calls > self.refuse_after:
                return False
            assert address % PAGE == 0 and nbytes > 0
            assert all(address + nbytes <= a or a + n <= address for a, n in self.pinned.items()), "pinned twice"
            self.pinned[address] = nbytes
            return True

    def unregister(self, address: int) -> None:
        assert address in self.pinned and address not in self.unpinned
        self.unpinned.append(address)


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    """Tensors of 5 to 40 pages at offsets that are not page-aligned, and small ones between them."""
    monkeypatch.setattr(page_cache, "MIN_BYTES", 4 * PAGE)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.big": torch.randn(10 * PAGE // 2 + 3, generator=g).to(torch.bfloat16),
        "b.small": torch.randn(7, generator=g),
        "c.big": torch.randint(0, 255, (40 * PAGE + 1,), generator=g, dtype=torch.uint8),
        "d.small": torch.arange(5, dtype=torch.int64),
        "e.big": torch.randn(5 * PAGE // 4, generator=g),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return fastq.open(tmp_path / "model.safetensors"), tensors


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _take_all(reads: PageCacheReads) -> list[tuple[str, torch.Tensor]]:
    got = list(reads.arrivals())
    reads.cancel()
    if reads.released is not None:
        reads.released.join()
    return got


def test_a_fresh_file_is_all_in_the_page_cache(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * PAGE + 5))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    import numpy as np

    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    assert resident_fraction(addr, 3 * PAGE + 5) == 1.0
    assert resident_fraction(addr + 10, 0) == 1.0


def _large(ck) -> list[tuple[int, int, str]]:
    return sorted((ck.offset(n), ck.meta(n).nbytes, n) for n in ck if ck.meta(n).nbytes >= 4 * PAGE)


@pytest.mark.parametrize("chunk_pages", [1, 3, 17, 1 << 18])
def test_every_large_tensor_arrives_with_its_bytes_in_file_order(ckpt, chunk_pages):
    ck, tensors = ckpt
    driver = Driver()
    reads = PageCacheReads(ck, torch.device("cpu"), ck.keys(), driver=driver, chunk_bytes=chunk_pages * PAGE)
    assert reads.names == {"a.big", "c.big", "e.big"}
    got = _take_all(reads)
    large = _large(ck)
    assert [n for n, _ in got] == [n for *_, n in large]  # file order
    for name, buf in got:
        assert torch.equal(buf, _bytes(tensors[name])), name
    # one run of chunks, each at most chunk_pages, from the page of the first large tensor to the end of
    # the page of the last one; each unpinned once the copies were done
    chunks = sorted(driver.pinned.items())
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(chunks))
    assert all(n <= chunk_pages * PAGE for _, n in chunks)
    first, (off, n, _) = large[0][0], large[-1]
    assert sum(n for _, n in chunks) == -(-(off + n) // PAGE) * PAGE - (first - first % PAGE)
    assert sorted(driver.unpinned) == sorted(driver.pinned)


@pytest.mark.parametrize("refuse_after", [0, 1, 4])
def test_a_refused_pin_stops_the_thread_and_hands_over_only_whole_tensors(ckpt, refuse_after, monkeypatch):
    """The pins after ``refuse_after`` fail: what lies wholly in the chunks pinned before arrives, the
    rest does not (the ring reads it), and nothing is raised."""
    monkeypatch.setattr(page_cache, "THREADS", 1)
    ck, tensors = ckpt
    driver = Driver(refuse_after)
    reads = PageCacheReads(ck, torch.device("cpu"), ck.keys(), driver=driver, chunk_bytes=8 * PAGE)
    got = _take_all(reads)
    large = _large(ck)
    pinned_to = large[0][0] - large[0][0] % PAGE + sum(driver.pinned.values())
    assert [n for n, _ in got] == [n for off, nb, n in large if off + nb <= pinned_to]
    assert len(got) < len(large) and len(driver.pinned) == refuse_after
    for name, buf in got:
        assert torch.equal(buf, _bytes(tensors[name])), name
    assert sorted(driver.unpinned) == sorted(driver.pinned)


def test_a_shard_not_in_the_page_cache_is_left_to_the_ring(ckpt, monkeypatch):
    ck, _ = ckpt
    monkeypatch.setattr(page_cache, "resident_fraction", lambda address, length: 0.5)
    driver = Driver()
    assert _take_all(PageCacheReads(ck, torch.device("cpu"), ck.keys(), driver=driver)) == []
    assert driver.calls == 0


def test_cancelled_before_the_end_drops_its_buffers_and_unpins(ckpt):
    ck, _ = ckpt
    driver = Driver()
    reads = PageCacheReads(ck, torch.device("cpu"), ck.keys(), driver=driver, chunk_bytes=PAGE)
    reads.cancel()
    if reads.released is not None:
        reads.released.join()
    assert list(reads.arrivals()) == []
    assert sorted(driver.unpinned) == sorted(driver.pinned)


def test_early_names_for_the_page_cache_leave_out_only_tensors_to_cast(ckpt):
    ck, _ = ckpt
    assert sorted(device_fill.early_names(ck, torch.bfloat16, every=False)) == ["a.big", "c.big", "d.small"]
    assert device_fill.early_names(ck, torch.bfloat16) is None


@pytest.mark.parametrize("refuse_after", [None, 2])
@pytest.mark.parametrize("kind", ["plain", "nf4-dq"])
def test_the_fill_places_every_tensor_from_the_page_cache_and_the_ring(tiny_model, tmp_path, monkeypatch, kind,
                                                                      refuse_after):
    """device_fill._fill_one on a CPU "device" with page-cache reads: the small tensors through the ring,
    the large ones from the page cache, and those a refused pin left behind through the ring too; every
    parameter ends up as a load on the CPU gives it."""
    monkeypatch.setattr(page_cache, "MIN_BYTES", 4 * PAGE)
    monkeypatch.setattr(page_cache, "THREADS", 1 if refuse_after is not None else 4)
    folder = tiny_model("llama")
    if kind != "plain":
        cfg = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
        fastq.convert(folder, tmp_path / "pre", cfg, progress=False)
        folder = tmp_path / "pre"
    prep = prepare(folder, dtype=torch.bfloat16)
    entries = [e for e in prep.plan.entries if e.kind != "tied"]
    driver = Driver(refuse_after)
    reads = PageCacheReads(prep.ckpt, torch.device("cpu"), device_fill.early_names(prep.ckpt, torch.bfloat16, False),
                           driver=driver, chunk_bytes=8 * PAGE)
    assert reads.names  # the case this test is for
    device_fill._fill_one(prep.model, prep.ckpt, entries, torch.device("cpu"), None, 2, None, None, reads)
    reads.cancel()
    ref = fastq.load(folder, None, "cpu", dtype=torch.bfloat16, progress=False).state_dict()
    got = {k: v for k, v in prep.model.state_dict().items() if not v.is_meta}  # tied ones: finalize's
    assert len(got) >= len(entries)
    for k, v in got.items():
        assert torch.equal(_bytes(v), _bytes(ref[k])), k
    if refuse_after is not None:
        assert len(driver.pinned) == refuse_after
