"""The host-to-device engine (fastq/transfer.py) on the CPU: every byte of every tensor lands in its
buffer, through a ring smaller than the tensors, in request order; read errors name the tensor. The
GPU half (pinned slots, events, quantizing on the device) is tests/test_gpu.py, run on a GPU."""

from __future__ import annotations

import importlib.util
import itertools
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import fastq
import pytest
import torch
from fastq import early_reads, transfer
from fastq.device_fill import _take_early
from fastq.device_map import default_device, single_device
from fastq.early_reads import EarlyReads, early_names
from safetensors.torch import save_file


def _gpu_bench(name: str):
    """The module benches/gpu/<name>.py (the GPU machine's scripts; their analysis runs anywhere)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benches" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(700, 1000, generator=g).to(torch.bfloat16),  # 1.4 MB: spans slots
        "small": torch.randn(17, generator=g),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(300_001, dtype=torch.int32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return fastq.open(tmp_path / "model.safetensors"), tensors


@pytest.mark.parametrize("slot_bytes", [4096, 1 << 20, 8 << 20])
def test_every_byte_lands_in_its_buffer_in_order(ckpt, slot_bytes):
    ck, tensors = ckpt
    order = ["small", "big", "empty", "ints", "big"]
    reqs = [transfer.Request((i, n), n, ck.meta(n).nbytes) for i, n in enumerate(order)]
    ring = transfer.PinnedRing(slot_bytes=slot_bytes, slots=3, pin=False)
    got = []
    transfer.stream_to_device(ck, reqs, torch.device("cpu"), lambda k, b: got.append((k, b.clone())), ring=ring,
                              threads=2)
    assert [k for k, _ in got] == [r.key for r in reqs]
    for (_, name), buf in got:
        ref = tensors[name].contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(buf, ref), name


@pytest.mark.parametrize("slot_bytes", [4096, 1 << 20, 8 << 20])
def test_shared_requests_next_to_each_other_are_views_of_one_block(ckpt, slot_bytes):
    """Whole shared requests next to each other in a slot land in one device block (one allocation, one
    copy), each an ALIGN-aligned view of its own bytes; a request that spans slots, or is not shared,
    keeps a buffer of its own - and every byte is where it was."""
    ck, tensors = ckpt
    order = ["small", "ints", "small", "big", "small", "empty", "small"]
    shared = [True, True, True, True, False, True, True]
    reqs = [transfer.Request(i, n, ck.meta(n).nbytes, shared=s) for i, (n, s) in enumerate(zip(order, shared))]
    ring = transfer.PinnedRing(slot_bytes=slot_bytes, slots=2, pin=False)
    got = {}
    transfer.stream_to_device(ck, reqs, torch.device("cpu"), lambda k, b: got.__setitem__(k, b), ring=ring, threads=2)
    for i, name in enumerate(order):
        assert torch.equal(got[i], tensors[name].contiguous().reshape(-1).view(torch.uint8)), (i, name)
    batches = list(transfer._batches(reqs, slot_bytes))
    whole = {i: k for k, b in enumerate(batches) for i, off, n, _ in b if n and off == 0 and n == reqs[i].nbytes}
    for i, j in itertools.combinations(range(len(reqs)), 2):
        one = got[i].untyped_storage().data_ptr() == got[j].untyped_storage().data_ptr()
        neighbours = all(shared[k] and k in whole and whole[k] == whole[i] for k in range(i, j + 1))
        assert one == (neighbours and reqs[i].nbytes > 0 and reqs[j].nbytes > 0), (i, j)
    assert all(got[i].storage_offset() % transfer.ALIGN == 0 for i in got)
    if slot_bytes == 8 << 20:  # everything fits one slot: the first four share, "small" (not shared) does not
        assert got[0].untyped_storage().data_ptr() == got[3].untyped_storage().data_ptr()
        assert got[4].untyped_storage().data_ptr() != got[3].untyped_storage().data_ptr()


def test_batches_split_large_tensors_and_cover_each_once():
    reqs = [transfer.Request(i, str(i), n) for i, n in enumerate([10, 0, 25, 7, 8])]
    batches = list(transfer._batches(reqs, 8))
    assert all(sum(n for _, _, n, _ in b) <= 8 for b in batches)
    for i, r in enumerate(reqs):
        pieces = sorted((off, n) for b in batches for j, off, n, _ in b if j == i)
        assert sum(n for _, n in pieces) == r.nbytes
        assert [off for off, _ in pieces] == [sum(n for _, n in pieces[:k]) for k in range(len(pieces))]
    for b in batches:  # slot offsets are disjoint and packed
        at = sorted((a, n) for _, _, n, a in b)
        assert all(a1 + n1 <= a2 for (a1, n1), (a2, _) in itertools.pairwise(at))


def test_a_shard_cut_short_under_the_reader_names_file_and_tensor(ckpt, tmp_path):
    ck, _ = ckpt
    path = tmp_path / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    last = ck.keys()[-1]  # file order: the tensor whose bytes were cut
    reqs = [transfer.Request("k", last, ck.meta(last).nbytes)]
    ring = transfer.PinnedRing(slot_bytes=1 << 20, slots=2, pin=False)
    with pytest.raises(fastq.TruncatedShardError) as e:
        transfer.stream_to_device(ck, reqs, torch.device("cpu"), lambda k, b: None, ring=ring)
    assert e.value.tensor == last and e.value.path == str(path)


def test_reader_refuses_a_read_only_or_too_small_destination(ckpt):
    ck, _ = ckpt
    reader = fastq._fastq.Reader(ck.native, 1)
    with pytest.raises(ValueError, match="writable"):
        reader.submit([("small", 0, 68, 0)], bytes(100))
    with pytest.raises(fastq.InvalidArgumentError, match="do not fit"):
        reader.submit([("small", 0, 68, 0)], bytearray(10))
    with pytest.raises(fastq.InvalidArgumentError, match="outside"):
        reader.submit([("small", 0, 69, 0)], bytearray(100))
    dst = bytearray(100)
    t = reader.submit([("small", 0, 68, 32)], dst)
    t.wait()
    assert t.done() and dst[32:100] == bytes(ck.get("small").numpy().tobytes())



def test_timeline_analysis_reads_gaps_and_overlaps():
    """benches/gpu/timeline.py on a timeline whose figures are known by construction."""
    mod = _gpu_bench("timeline")
    r = mod.analyse({
        "read": [[0.0, 1.0], [0.5, 2.0], [3.0, 4.0]],  # in flight 0-2 and 3-4: a gap of 1 s
        "copy": [[1.0, 1.5], [2.0, 3.5], [4.0, 4.5]],  # busy through the whole gap
        "device": [[1.25, 1.75], [2.5, 2.75]],  # overlaps the copies 0.25 + 0.25 s; 0.25 s in the gap
    })
    assert r["reads"] == 3 and r["read_span_s"] == 4.0
    assert r["no_read_s"] == 1.0
    assert r["copy_busy_in_no_read_s"] == 1.0
    assert r["device_busy_in_no_read_s"] == 0.25
    assert r["copy_device_overlap_s"] == 0.5
    assert r["reads_in_flight"] == (1.0 + 1.5 + 1.0) / 4.0
    assert r["read_end_to_copy_start_ms"] == 0.0  # waits of 0, 0 and 0 ms


def test_a_stop_ends_the_stream_between_batches_and_frees_the_ring(ckpt):
    """``stop`` is checked before each batch: set by the first callback, nothing after that batch is
    handed over, no error; the ring is free for the next stream at once (its lock released)."""
    ck, tensors = ckpt
    order = ["small", "ints", "big"]  # 68 B, 1.2 MB, 1.4 MB: several 64 KiB batches after the first
    reqs = [transfer.Request(n, n, ck.meta(n).nbytes) for n in order]
    ring = transfer.PinnedRing(slot_bytes=64 << 10, slots=3, pin=False)
    stop, got = threading.Event(), []

    def on_ready(k, b):
        got.append(k)
        stop.set()

    transfer.stream_to_device(ck, reqs, torch.device("cpu"), on_ready, ring=ring, threads=2, stop=stop)
    assert got == ["small"]
    assert not ring.lock.locked()
    again = []
    transfer.stream_to_device(ck, reqs, torch.device("cpu"), lambda k, b: again.append((k, b.clone())), ring=ring)
    assert [k for k, _ in again] == order
    assert torch.equal(again[2][1], tensors["big"].reshape(-1).view(torch.uint8))


def test_an_error_in_a_callback_leaves_no_read_in_the_ring(ckpt):
    """A callback that raises (an install refusing a tensor) ends the stream with its error, after the
    reads still writing into the ring's slots ended; the ring is free again."""
    ck, _ = ckpt
    reqs = [transfer.Request(n, n, ck.meta(n).nbytes) for n in ["small", "ints", "big"]]
    ring = transfer.PinnedRing(slot_bytes=64 << 10, slots=3, pin=False)

    def on_ready(k, b):
        raise fastq.QuantStateError(f"refused {k}")

    with pytest.raises(fastq.QuantStateError, match="refused small"):
        transfer.stream_to_device(ck, reqs, torch.device("cpu"), on_ready, ring=ring, threads=2)
    assert not ring.lock.locked()


def _ring_free() -> bool:
    return transfer._RING is None or not transfer._RING.lock.locked()


def test_early_reads_hand_over_every_tensor_in_file_order(ckpt):
    ck, tensors = ckpt
    early = EarlyReads(ck, torch.device("cpu"), ck.keys(), threads=2)
    got = list(early.arrivals())
    assert [n for n, _ in got] == ck.keys()
    for name, buf in got:
        assert torch.equal(buf, tensors[name].contiguous().reshape(-1).view(torch.uint8)), name
    early.cancel()  # after the end: nothing to stop, returns


def test_early_reads_raise_the_read_error_where_they_are_taken(ckpt, tmp_path):
    ck, _ = ckpt
    path = tmp_path / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    early = EarlyReads(ck, torch.device("cpu"), ck.keys(), threads=2)
    with pytest.raises(fastq.TruncatedShardError) as e:
        list(early.arrivals())
    assert e.value.tensor == ck.keys()[-1] and e.value.path == str(path)
    early.cancel()
    assert early._upload is None and early._ring is None


def test_cancelled_early_reads_end_their_arrivals_and_drop_their_buffers(ckpt):
    ck, _ = ckpt
    early = EarlyReads(ck, torch.device("cpu"), ck.keys(), threads=2)
    early.cancel()
    assert not early._thread.is_alive()
    assert early._order == []
    assert early._upload is None and early._ring is None  # the Rust upload ended, its ring handed back
    assert list(early.arrivals()) == []  # ends: no wait for tensors that will not come


def test_the_rust_upload_fills_shared_blocks_of_small_neighbours_and_lone_large_tensors(tmp_path, monkeypatch):
    """early_reads._allocate + _fastq.Upload: tensors under SMALL_TENSOR next to each other are views of
    one block (each at a multiple of ALIGN), larger ones alone; every byte lands, through a ring of
    slots smaller than the large tensor, and the timeline gets the upload's reads and copies."""
    monkeypatch.setattr(early_reads, "SMALL_TENSOR", 4096)
    g = torch.Generator().manual_seed(5)
    tensors = {"a.absmax": torch.randn(33, generator=g), "a.weight": torch.randint(0, 255, (3000, 7), generator=g,
               dtype=torch.uint8), "b.absmax": torch.randn(5, generator=g), "b.quant_map": torch.randn(16, generator=g),
               "c.weight": torch.randint(0, 255, (9000,), generator=g, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = fastq.open(tmp_path / "model.safetensors")
    timeline = transfer.Timeline()
    early = EarlyReads(ck, torch.device("cpu"), ck.keys(), threads=2, timeline=timeline)
    got = dict(early.arrivals())
    for name, t in tensors.items():
        assert torch.equal(got[name], t.reshape(-1).view(torch.uint8)), name
    base = {n: b.untyped_storage().data_ptr() for n, b in got.items()}
    assert ck.keys() == ["a.absmax", "b.absmax", "b.quant_map", "a.weight", "c.weight"]  # safetensors' file order
    assert base["a.absmax"] == base["b.absmax"] == base["b.quant_map"]  # neighbours share a block
    assert len({base["a.absmax"], base["a.weight"], base["c.weight"]}) == 3
    assert all((b.data_ptr() - base[n]) % transfer.ALIGN == 0 for n, b in got.items())
    s = timeline.summary()
    assert s["read"]["GB"] * 1e9 >= sum(b.numel() for b in got.values())
    assert s["copy"]["GB"] == s["read"]["GB"] and s["copy"]["end"] >= s["copy"]["start"]
    assert _ring_free()


def test_the_rust_upload_never_takes_the_gil(ckpt):
    """_fastq.Upload runs to its end while this thread holds the GIL throughout (a busy loop under a
    1,000 s switch interval: no other Python thread runs meanwhile) - reads, copies and slot recycling
    need no Python. The Python loop (stream_to_device) could not: it would never end here."""
    ck, tensors = ckpt
    dst = {n: torch.empty(ck.meta(n).nbytes, dtype=torch.uint8) for n in ck}
    requests = [(d.data_ptr(), d.numel(), [(n, 0, d.numel(), 0)] if d.numel() else []) for n, d in dst.items()]
    slots = [torch.empty(4096, dtype=torch.uint8).numpy() for _ in range(3)]  # 1.4 MB through 12 KiB
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        up = fastq._fastq.Upload(ck.native, requests, slots, threads=2)
        deadline = time.monotonic() + 120  # a bound for a broken build, not a speed
        while not up.finished() and time.monotonic() < deadline:
            pass
    finally:
        sys.setswitchinterval(old)
    assert up.finished() and up.wait() == len(dst)
    for n, t in tensors.items():
        assert torch.equal(dst[n], t.contiguous().reshape(-1).view(torch.uint8)), n


def test_the_rust_upload_refuses_a_bad_request_before_it_reads():
    """_fastq.Upload checks every request against the checkpoint first: a piece outside its tensor or
    its buffer is an InvalidArgumentError, an unknown tensor an UnknownTensorError; a stream asked for
    where there is no CUDA driver a DeviceError."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file({"t": torch.arange(10, dtype=torch.uint8)}, os.path.join(d, "m.safetensors"))
        ck = fastq.open(os.path.join(d, "m.safetensors"))
        dst, slot = torch.zeros(10, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8).numpy()
        with pytest.raises(fastq.InvalidArgumentError):
            fastq._fastq.Upload(ck.native, [(dst.data_ptr(), 5, [("t", 0, 10, 0)])], [slot])
        with pytest.raises(fastq.UnknownTensorError):
            fastq._fastq.Upload(ck.native, [(dst.data_ptr(), 10, [("u", 0, 10, 0)])], [slot])
        with pytest.raises(fastq.InvalidArgumentError):
            fastq._fastq.Upload(ck.native, [], [])
        up = fastq._fastq.Upload(ck.native, [(dst.data_ptr(), 10, [("t", 0, 10, 0)])], [slot])
        assert up.wait() == 1 and up.finished() and up.done() == 1
        assert torch.equal(dst, torch.arange(10, dtype=torch.uint8))
        if not torch.cuda.is_available():  # no driver here: a DeviceError, not a crash (GPU: tests/test_gpu.py)
            with pytest.raises(fastq.DeviceError, match="libcuda|context"):
                fastq._fastq.Upload(ck.native, [(dst.data_ptr(), 10, [("t", 0, 10, 0)])], [slot], stream=0)


def test_take_early_gives_each_request_its_tensor_once():
    """device_fill._take_early: a tensor two parameters read goes to both (a copy to the first), one no
    parameter reads is dropped, and the requests the early reads did not serve are returned to be read:
    those of tensors that did not arrive and those assembled from pieces."""
    bufs = {n: torch.arange(k, k + 4, dtype=torch.uint8) for k, n in enumerate(["a", "unused", "b"])}

    class Early:
        def arrivals(self):
            yield from bufs.items()

    reqs = [transfer.Request("a1", "a", 4), transfer.Request("b1", "b", 4), transfer.Request("a2", "a", 4),
            transfer.Request("c1", "c", 4), transfer.Request("p", "a", 8, pieces=(("a", 0, 4), ("b", 4, 4)))]
    got = {}
    left = _take_early(Early(), reqs, lambda k, b: got.setdefault(k, b))
    assert set(got) == {"a1", "a2", "b1"}
    assert torch.equal(got["a1"], bufs["a"]) and torch.equal(got["a2"], bufs["a"])
    assert got["a1"].data_ptr() != got["a2"].data_ptr()
    assert got["b1"] is bufs["b"]
    assert [r.key for r in left] == ["c1", "p"]


def test_early_names_are_the_file_order_unless_a_tensor_would_be_cast(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"norm.weight": torch.randn(8, generator=g).to(torch.bfloat16), "pos": torch.arange(4),
               "embed.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = fastq.open(tmp_path / "model.safetensors")
    assert early_names(ck, torch.bfloat16) == ck.keys()
    assert early_names(ck, torch.float16) is None  # the bfloat16 weights would be cast: not read early


def test_early_names_of_a_prequantized_checkpoint_skip_what_the_host_reads_or_the_plan_casts(tmp_path):
    """A pre-quantized checkpoint's early reads: packed weights, statistics (any dtype) and the tensors
    stored in the load's dtype; not the QuantState JSONs nor int8 layout markers (read on the host) nor
    a float tensor other than a statistic that would be cast."""
    def u8(n):
        return torch.zeros(n, dtype=torch.uint8)

    tensors = {"l.weight": u8(4), "l.weight.absmax": torch.ones(2), "l.weight.quant_map": torch.ones(16),
               "l.weight.nested_absmax": torch.ones(1), "l.weight.nested_quant_map": torch.ones(256),
               "l.weight.quant_state.bitsandbytes__nf4": u8(9), "m.weight": u8(4).to(torch.int8), "m.SCB": torch.ones(2),
               "m.weight_format": u8(1), "norm.weight": torch.ones(4), "embed.weight": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = fastq.open(tmp_path / "model.safetensors")
    got = early_names(ck, torch.bfloat16, prequantized=True)
    assert got == [n for n in ck if n not in ("l.weight.quant_state.bitsandbytes__nf4", "m.weight_format",
                                                     "norm.weight")]
    assert "norm.weight" in early_names(ck, torch.float32, prequantized=True)
    assert early_names(ck, torch.bfloat16) is None  # unquantized rule: a cast turns early reads off


@pytest.mark.parametrize(("mode", "plain", "pre"), [("1", True, True), (True, True, True), ("plain", True, False),
                                                    ("0", False, False), (False, False, False)])
def test_early_reads_mode_chooses_the_checkpoints_read_early(tmp_path, monkeypatch, mode, plain, pre):
    """FASTQ_EARLY_READS: "1" both kinds, "plain" unquantized only (before run 15), "0" neither;
    FASTQ_EARLY_THREADS: their reader threads when the load names none."""
    save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    ck = fastq.open(tmp_path / "model.safetensors")
    monkeypatch.setattr(early_reads, "EARLY_READS", mode)
    monkeypatch.setattr(early_reads.dmap_mod, "cuda_device", lambda dev: torch.device("cpu"))  # a CPU "GPU"
    started = []
    monkeypatch.setattr(early_reads, "EarlyReads", lambda *a, **k: started.append((a[2], a[3])) or a[2])
    monkeypatch.setenv("FASTQ_EARLY_THREADS", "3")  # the early reads' own thread count, unless the load names one
    for prequantized, want in ((False, plain), (True, pre)):
        started.clear()
        got = early_reads.start_early_reads(ck, {"": 0}, torch.bfloat16, prequantized=prequantized)
        assert (got is not None, started) == (want, [(["w"], 3)] if want else []), prequantized
    started.clear()
    early_reads.start_early_reads(ck, {"": 0}, torch.bfloat16, threads=5)
    assert started == ([(["w"], 5)] if plain else [])


def test_single_device_is_known_before_the_model():
    assert single_device(None) == default_device()
    assert single_device({"": 0}) == single_device(0) == single_device("cuda") == "cuda:0"
    assert single_device(torch.device("cuda", 1)) == "cuda:1"
    assert single_device("cpu") == single_device({"": "cpu"}) == "cpu"
    assert single_device("auto") is None and single_device({"a": 0, "b": 1}) is None


def test_gpu_compare_samples_anonymous_and_file_backed_peaks(tmp_path):
    """benches/gpu/compare.py's HostSampler: memory touched while it runs shows in its kind's peak -
    anonymous for private pages, shared for a shared mapping, file-backed for a mapped file read through."""
    mod = _gpu_bench("compare")
    size = 64 << 20
    f = tmp_path / "blob"
    f.write_bytes(b"\1" * size)
    before = mod.HostSampler()
    base = before.stop()
    sampler = mod.HostSampler()
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    with mmap.mmap(-1, size, flags=private) as anon, mmap.mmap(-1, size) as shared, open(f, "rb") as fh, \
            mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        anon.write(b"\2" * size)  # fresh private pages, written: resident (not reused heap)
        shared.write(b"\3" * size)  # a shared anonymous mapping: shmem
        assert sum(m[i] for i in range(0, size, 4096)) == size // 4096  # every page of the file read
        peak = sampler.stop()
    for kind in ("anon", "shmem", "file"):
        assert peak[kind] - base[kind] >= 0.9 * size / 1e9, kind
