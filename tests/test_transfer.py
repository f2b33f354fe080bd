"""The host-to-device engine (fastq/transfer.py) on the CPU: every byte of every tensor lands in its
buffer, through a ring smaller than the tensors, in request order; read errors name the tensor. The
GPU half (pinned slots, events, quantizing on the device) is tests/test_gpu.py, run on a GPU."""

from __future__ import annotations

import itertools
import os

import fastq
import pytest
import torch
from fastq import transfer
from safetensors.torch import save_file


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
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benches" / "gpu" / "timeline.py"
    spec = importlib.util.spec_from_file_location("timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
