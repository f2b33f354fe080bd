"""fastq.open on safetensors checkpoints: layouts, zero-copy reads, parallel quantization, and files that
lie. Every bad input must raise a precise fastq exception naming the file (and the tensor where there is
one), never crash the interpreter."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import struct
import sys
import threading
import time

import bitsandbytes.functional  # noqa: F401 - imported here so that no GIL test times its first import
import fastq
import pytest
import torch
from fastq import _fastq
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(33, 16, generator=g),
        "model.layers.0.q.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "model.layers.0.k.weight": torch.randn(40, 70, generator=g).to(torch.float16),
        "model.layers.0.norm.weight": torch.ones(48),
        "model.layers.0.position_ids": torch.arange(17, dtype=torch.int64),
        "model.layers.0.mask": torch.rand(5, 3, generator=g) > 0.5,
        "model.layers.0.bytes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "model.layers.0.scale": torch.randn(12, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.scale2": torch.randn(7, generator=g).to(torch.float8_e5m2),
        "lm_head.weight": torch.randn(100, 16, generator=g).to(torch.bfloat16),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def header_of(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def write_raw(path, header, data: bytes = b"", header_len: int | None = None) -> str:
    """A safetensors file by hand: 8-byte little-endian header length, header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + h + data)
    return str(path)


def write_sharded(root, ts: dict[str, torch.Tensor], nshards: int = 3, index: bool = True) -> dict[str, str]:
    """Shards named like transformers names them, and (optionally) the index; returns the weight map."""
    names = list(ts)
    weight_map = {}
    for i in range(nshards):
        shard = f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"
        part = {n: ts[n] for n in names[i::nshards]}
        save_file(part, os.path.join(root, shard), metadata={"format": "pt", "shard": str(i)})
        weight_map.update({n: shard for n in part})
    if index:
        total = sum(t.numel() * t.element_size() for t in ts.values())
        with open(os.path.join(root, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return weight_map


@pytest.fixture
def single(tmp_path):
    ts = tensors()
    path = str(tmp_path / "model.safetensors")
    save_file(ts, path, metadata={"format": "pt"})
    return path, ts


# ------------------------------------------------------------------------------------------ layouts


def check_contents(ck: fastq.Checkpoint, ts: dict[str, torch.Tensor]) -> None:
    assert sorted(ck.keys()) == sorted(ts)
    assert len(ck) == len(ts)
    for name, t in ts.items():
        assert name in ck
        meta = ck.meta(name)
        assert meta.shape == tuple(t.shape)
        assert meta.torch_dtype == t.dtype
        assert meta.nbytes == t.numel() * t.element_size()
        got = ck.get(name)
        assert same_bits(got, t), name
    assert ck.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())


def test_single_file(single):
    path, ts = single
    ck = fastq.open(path)
    check_contents(ck, ts)
    assert ck.shard_paths == [path]
    assert ck.metadata() == {"format": "pt"}
    assert {ck.meta(n).dtype for n in ts} >= {"F32", "BF16", "F16", "I64", "BOOL", "U8", "F8_E4M3", "F8_E5M2"}
    assert all(ck.meta(n).file == path for n in ts)


def test_indexed_folder(tmp_path):
    ts = tensors()
    weight_map = write_sharded(tmp_path, ts)
    ck = fastq.open(tmp_path)
    check_contents(ck, ts)
    assert len(ck.shard_paths) == 3
    for name, shard in weight_map.items():
        assert ck.meta(name).file == str(tmp_path / shard)
    assert sorted(ck.metadata(i)["shard"] for i in range(3)) == ["0", "1", "2"]


def test_indexed_folder_ignores_stray_files(tmp_path):
    """With an index, only the shards it names are opened (a broken stray file does no harm)."""
    ts = tensors()
    write_sharded(tmp_path, ts)
    write_raw(tmp_path / "stray.safetensors", b"not json")
    ck = fastq.open(tmp_path)
    check_contents(ck, ts)


def test_folder_of_shards_without_index(tmp_path):
    ts = tensors()
    write_sharded(tmp_path, ts, nshards=2, index=False)
    (tmp_path / "README.md").write_text("not a shard")
    ck = fastq.open(tmp_path)
    check_contents(ck, ts)
    assert ck.shard_paths == sorted(ck.shard_paths)


def test_get_is_zero_copy(single):
    """get() wraps the shard's mapping: the tensor's storage is the Buffer's bytes, and tensors sit at
    their header offsets from one another."""
    path, ts = single
    ck = fastq.open(path)
    _, header = header_of(path)
    base = None
    for name in ts:
        t = ck.get(name)
        addr = ck._ck.get(name).address
        assert t.data_ptr() == addr, name
        assert ck.get(name).data_ptr() == addr  # the same mapping every time
        start = header[name]["data_offsets"][0]
        if base is None:
            base = addr - start
        assert addr - start == base, name


def test_get_writes_stay_private(single):
    path, ts = single
    before = pathlib.Path(path).read_bytes()
    ck = fastq.open(path)
    t = ck.get("model.embed.weight")
    t.fill_(7.0)
    assert pathlib.Path(path).read_bytes() == before
    assert same_bits(fastq.open(path).get("model.embed.weight"), ts["model.embed.weight"])


def test_get_outlives_checkpoint(single):
    path, ts = single
    t = fastq.open(path).get("lm_head.weight")  # the Buffer keeps the mapping alive
    gc.collect()
    assert same_bits(t, ts["lm_head.weight"])


# ------------------------------------------------------------------------------------- quantization

JOBS = [
    ("model.embed.weight", fastq.Spec4bit("nf4", 64, True)),
    ("model.layers.0.q.weight", fastq.Spec4bit("fp4", 128, False)),
    ("model.layers.0.k.weight", fastq.Spec4bit("nf4", 32, True, torch.bfloat16)),
    ("lm_head.weight", fastq.Spec4bit("fp4", 4096, True, torch.float32)),
    ("model.layers.0.norm.weight", fastq.Spec4bit("nf4", 256, False)),
    ("model.embed.weight#int8", fastq.SPEC_INT8),
    ("model.layers.0.q.weight#int8", fastq.SPEC_INT8),
    ("lm_head.weight#int8", fastq.SPEC_INT8),
]


def run_jobs(ck, **kw):
    """Checkpoint.quantize over JOBS (a name may appear once per kind, so int8 jobs are run apart)."""
    four = [(n, s) for n, s in JOBS if s != fastq.SPEC_INT8]
    eight = [(n.split("#")[0], s) for n, s in JOBS if s == fastq.SPEC_INT8]
    out = list(ck.quantize(four, **kw))
    assert [n for n, _ in out] == [n for n, _ in four]  # job order
    res = {n: r for n, r in out}
    out8 = list(ck.quantize(eight, **kw))
    assert [n for n, _ in out8] == [n for n, _ in eight]
    res.update({n + "#int8": r for n, r in out8})
    return res


def check_against_ops(ts, res) -> None:
    for name, spec in JOBS:
        t = ts[name.split("#")[0]]
        if spec == fastq.SPEC_INT8:
            cb, scb = res[name]
            rcb, rscb = fastq.ops.quantize_int8(t)
            assert same_bits(cb, rcb) and same_bits(scb, rscb), name
            continue
        packed, state = res[name]
        rp, rs = fastq.ops.quantize_4bit(
            t, spec.blocksize, spec.quant_type, spec.double_quant, spec.quant_storage
        )
        assert same_bits(packed, rp), name
        assert same_bits(state.absmax, rs.absmax), name
        assert state.shape == rs.shape and state.dtype == rs.dtype and state.blocksize == rs.blocksize
        assert state.quant_type == rs.quant_type
        if spec.double_quant:
            assert same_bits(state.offset.reshape(1), rs.offset.reshape(1)), name
            assert same_bits(state.state2.absmax, rs.state2.absmax), name
        else:
            assert state.state2 is None


@pytest.mark.parametrize("layout", ["file", "indexed", "folder"])
def test_quantize_equals_ops(tmp_path, layout):
    ts = tensors()
    if layout == "file":
        save_file(ts, str(tmp_path / "model.safetensors"))
    else:
        write_sharded(tmp_path, ts, index=layout == "indexed")
    ck = fastq.open(tmp_path if layout != "file" else tmp_path / "model.safetensors")
    check_against_ops(ts, run_jobs(ck))
    check_against_ops(ts, run_jobs(ck, threads=1, release_pages=False))
    # Pages released after quantizing come back from the file.
    for name, t in ts.items():
        assert same_bits(ck.get(name), t), name


def test_quantize_all_and_dequantize(single):
    path, ts = single
    ck = fastq.open(path)
    res = ck.quantize_all([("model.layers.0.q.weight", fastq.Spec4bit())])
    packed, state = res["model.layers.0.q.weight"]
    out = fastq.ops.dequantize_4bit(packed, state)
    w = ts["model.layers.0.q.weight"]
    assert out.dtype == w.dtype and out.shape == w.shape
    assert float((out.float() - w.float()).abs().max()) < 0.2 * float(w.float().abs().max())


def test_quantize_stops_early(tmp_path):
    """Abandoning the iterator midway neither hangs nor leaks an error."""
    ts = {f"w{i}": torch.randn(256, 256) for i in range(12)}
    save_file(ts, str(tmp_path / "m.safetensors"))
    ck = fastq.open(tmp_path / "m.safetensors")
    it = ck.quantize([(n, fastq.Spec4bit()) for n in ts])
    name, _ = next(it)
    assert name == "w0"
    it.close()
    assert len(ck.quantize_all([(n, "int8") for n in ts])) == 12


# ---------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(fastq.MissingFileError) as e:
        fastq.open(tmp_path / "nope.safetensors")
    assert isinstance(e.value, FileNotFoundError)
    assert e.value.path == str(tmp_path / "nope.safetensors")


def test_empty_folder(tmp_path):
    with pytest.raises(fastq.MissingFileError):
        fastq.open(tmp_path)


@pytest.mark.parametrize("cut", ["one byte", "half the last tensor", "all data"])
def test_truncated_shard(single, cut):
    path, _ = single
    n, header = header_of(path)
    size = os.path.getsize(path)
    ends = {k: 8 + n + v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}
    last = max(ends, key=ends.get)
    new = {
        "one byte": size - 1,
        "half the last tensor": size - (ends[last] - 8 - n - header[last]["data_offsets"][0]) // 2,
        "all data": 8 + n,
    }[cut]
    os.truncate(path, new)
    with pytest.raises(fastq.TruncatedShardError) as e:
        fastq.open(path)
    assert isinstance(e.value, fastq.HeaderError)
    assert e.value.path == path
    assert e.value.tensor in {k for k, end in ends.items() if end > new}
    if cut == "one byte":
        assert e.value.tensor == last
    assert path in str(e.value) and e.value.tensor in str(e.value)


def test_truncated_inside_header(single):
    path, _ = single
    n, _ = header_of(path)
    os.truncate(path, 8 + n // 2)
    with pytest.raises(fastq.HeaderError, match="past the end") as e:
        fastq.open(path)
    assert e.value.path == path


F32_2x2 = {"dtype": "F32", "shape": [2, 2]}


@pytest.mark.parametrize(
    "case",
    [
        "size mismatch",
        "overlap",
        "header length past end",
        "not json",
        "json not an object",
        "shorter than 8 bytes",
        "header length over limit",
        "offsets backwards",
        "entry malformed",
        "shape overflows",
    ],
)
def test_lying_header(tmp_path, case):
    p = tmp_path / "bad.safetensors"
    data = bytes(32)
    if case == "size mismatch":
        path = write_raw(p, {"a": {**F32_2x2, "data_offsets": [0, 12]}}, data)
    elif case == "overlap":
        path = write_raw(
            p, {"a": {**F32_2x2, "data_offsets": [0, 16]}, "b": {**F32_2x2, "data_offsets": [8, 24]}}, data
        )
    elif case == "header length past end":
        path = write_raw(p, {"a": {**F32_2x2, "data_offsets": [0, 16]}}, data, header_len=10_000)
    elif case == "not json":
        path = write_raw(p, b"{this is not json", data)
    elif case == "json not an object":
        path = write_raw(p, b"[1, 2, 3]", data)
    elif case == "shorter than 8 bytes":
        p.write_bytes(b"\x01\x00\x00")
        path = str(p)
    elif case == "header length over limit":
        path = write_raw(p, b"{}", data, header_len=2**40)
    elif case == "offsets backwards":
        path = write_raw(p, {"a": {**F32_2x2, "data_offsets": [16, 0]}}, data)
    elif case == "entry malformed":
        path = write_raw(p, {"a": {"dtype": "F32", "data_offsets": [0, 16]}}, data)
    elif case == "shape overflows":
        path = write_raw(p, {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, data)
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(path)
    assert e.value.path == path
    assert path in str(e.value)
    if case in ("size mismatch", "overlap", "shape overflows"):
        assert e.value.tensor == "a"


#: Header bytes of the files below, padded with spaces: their data section starts at byte 8 + PAD.
PAD = 256
U64_MAX = 2**64 - 1


def write_padded(path, header: dict, data: bytes = bytes(64)) -> str:
    h = json.dumps(header).encode()
    assert len(h) <= PAD
    return write_raw(path, h + b" " * (PAD - len(h)), data)


def entry_a(dtype: str, shape, offsets) -> dict:
    return {"a": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


# (header of tensor "a", the exception class, a word of its message). Before checked arithmetic the
# first two opened, pointing "a" at the header's own bytes (a release build wraps), and some others
# panicked in Rust (a PanicException, not even an Exception).
OVERFLOWS = {
    "end overflows": (entry_a("F32", [2, 2], [U64_MAX - 16, U64_MAX]), fastq.HeaderError, "overflow"),
    "end wraps": (entry_a("F32", [2, 2], [U64_MAX - 8 - PAD - 7, U64_MAX - 8 - PAD + 9]), fastq.HeaderError,
                  "overflow"),
    "end far past the file": (entry_a("F32", [2, 2], [2**63, 2**63 + 16]), fastq.TruncatedShardError, "truncated"),
    "numel overflows": (entry_a("F32", [2**32, 2**32, 2], [0, 16]), fastq.HeaderError, "overflows"),
    "bytes overflow": (entry_a("F32", [2**62], [0, 16]), fastq.HeaderError, "overflows"),
    "product wraps to the span": (entry_a("U8", [2**62 + 1, 4], [0, 4]), fastq.HeaderError, "overflows"),
    "negative dim": (entry_a("F32", [-1, 4], [0, 16]), fastq.HeaderError, "malformed"),
    "dim past u64": (entry_a("F32", [2**64, 1], [0, 16]), fastq.HeaderError, "malformed"),
    "negative offset": (entry_a("U8", [1], [-1, 0]), fastq.HeaderError, "malformed"),
    "float offset": (entry_a("U8", [1], [0, 1e30]), fastq.HeaderError, "malformed"),
}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_overflowing_claims(tmp_path, case):
    header, cls, word = OVERFLOWS[case]
    path = write_padded(tmp_path / "bad.safetensors", header)
    with pytest.raises(cls) as e:
        fastq.open(path)
    assert type(e.value) is cls
    assert e.value.path == path and path in str(e.value)
    assert e.value.tensor == "a" and "'a'" in str(e.value)
    assert word in str(e.value)


@pytest.mark.parametrize("header_len", [U64_MAX, U64_MAX - 7, 2**63, 100_000_001, PAD + 64 + 1])
def test_header_length_near_2_64_or_past_the_end(tmp_path, header_len):
    path = write_raw(tmp_path / "bad.safetensors", b"{}" + b" " * (PAD - 2), bytes(64), header_len=header_len)
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(path)
    assert type(e.value) is fastq.HeaderError
    assert e.value.path == path and path in str(e.value) and e.value.tensor is None


def test_same_tensor_twice_in_a_header(tmp_path):
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}'
    text = ('{"a":' + entry % (0, 1) + ',"a":' + entry % (1, 2) + "}").encode()
    path = write_raw(tmp_path / "twice.safetensors", text, b"xy")
    with pytest.raises(fastq.HeaderError, match="twice") as e:
        fastq.open(path)
    assert e.value.path == path and e.value.tensor == "a"


def test_zero_sized_tensor_with_huge_dims(tmp_path):
    path = write_padded(tmp_path / "m.safetensors", entry_a("F32", [0, 2**62], [0, 0]))
    t = fastq.open(path).get("a")
    assert t.shape == (0, 2**62) and t.numel() == 0


@pytest.mark.parametrize("shape", [[2**62 + 1, 4], [2**63, 2], [3]])
def test_quantizer_shape_that_wraps(shape):
    """A shape whose product wraps to the buffer's length once passed, then sized SCB from it."""
    data = torch.ones(4).view(torch.uint8).numpy()
    for quantize in (_fastq.quantize_int8, _fastq.quantize_4bit):
        with pytest.raises(fastq.ShapeError):
            quantize(data, "F32", shape)


def test_header_lies_inside_a_folder(tmp_path):
    """A bad shard among good ones is named, not the folder."""
    write_sharded(tmp_path, tensors(), nshards=2, index=False)
    bad = write_raw(tmp_path / "model-00003-of-00003.safetensors", {"x": {**F32_2x2, "data_offsets": [0, 8]}})
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(tmp_path)
    assert e.value.path == bad


def test_unknown_dtype_in_header(tmp_path):
    path = write_raw(
        tmp_path / "m.safetensors", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    )
    with pytest.raises(fastq.UnsupportedDtypeError) as e:
        fastq.open(path)
    assert e.value.path == path and e.value.tensor == "w"
    assert "F128" in str(e.value)


def test_valid_hand_written_file(tmp_path):
    """The hand-written format the negative tests use is itself read correctly."""
    data = struct.pack("<4f", 1, 2, 3, 4) + struct.pack("<2e", 0.5, -0.5)
    header = {
        "__metadata__": {"k": "v"},
        "a": {**F32_2x2, "data_offsets": [0, 16]},
        "h": {"dtype": "F16", "shape": [2], "data_offsets": [16, 20]},
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [20, 20]},
    }
    ck = fastq.open(write_raw(tmp_path / "m.safetensors", header, data))
    assert ck.get("a").tolist() == [[1, 2], [3, 4]]
    assert ck.get("h").tolist() == [0.5, -0.5]
    assert ck.get("empty").shape == (0, 3)
    assert ck.metadata() == {"k": "v"}


def test_index_names_missing_shard(tmp_path):
    weight_map = write_sharded(tmp_path, tensors())
    victim = "model-00002-of-00003.safetensors"
    os.remove(tmp_path / victim)
    with pytest.raises(fastq.MissingFileError) as e:
        fastq.open(tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    assert e.value.path == str(tmp_path / INDEX)
    assert weight_map[e.value.tensor] == victim
    assert victim in str(e.value)


def rewrite_index(root, f) -> None:
    p = os.path.join(root, INDEX)
    with open(p) as fh:
        idx = json.load(fh)
    f(idx["weight_map"])
    with open(p, "w") as fh:
        json.dump(idx, fh)


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    weight_map = write_sharded(tmp_path, tensors())
    name = "lm_head.weight"
    wrong = next(s for s in set(weight_map.values()) if s != weight_map[name])
    rewrite_index(tmp_path, lambda m: m.__setitem__(name, wrong))
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(tmp_path)
    assert e.value.tensor == name
    assert e.value.path == str(tmp_path / INDEX)
    assert wrong in str(e.value)


def test_index_names_tensor_no_shard_holds(tmp_path):
    write_sharded(tmp_path, tensors())
    rewrite_index(tmp_path, lambda m: m.__setitem__("ghost.weight", "model-00001-of-00003.safetensors"))
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(tmp_path)
    assert e.value.tensor == "ghost.weight"


def test_index_not_json(tmp_path):
    write_sharded(tmp_path, tensors())
    (tmp_path / INDEX).write_text("{ nope")
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(tmp_path)
    assert e.value.path == str(tmp_path / INDEX)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(fastq.HeaderError) as e:
        fastq.open(tmp_path)
    assert e.value.tensor == "w"


def test_unknown_tensor(single):
    path, _ = single
    ck = fastq.open(path)
    assert "nope" not in ck
    for call in (
        lambda: ck.get("nope"),
        lambda: ck.meta("nope"),
        lambda: ck.quantize_all([("nope", "int8")]),
    ):
        with pytest.raises(fastq.UnknownTensorError) as e:
            call()
        assert isinstance(e.value, KeyError)
        assert e.value.tensor == "nope" and e.value.path == path
        assert "nope" in str(e.value)


@pytest.mark.parametrize(
    "name", ["model.layers.0.position_ids", "model.layers.0.mask", "model.layers.0.scale"]
)
@pytest.mark.parametrize("spec", [fastq.Spec4bit(), fastq.SPEC_INT8], ids=["4bit", "int8"])
def test_quantize_unsupported_dtype(single, name, spec):
    path, _ = single
    ck = fastq.open(path)
    with pytest.raises(fastq.UnsupportedDtypeError) as e:
        ck.quantize_all([(name, spec)])
    assert isinstance(e.value, TypeError)
    assert e.value.path == path and e.value.tensor == name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", [fastq.Spec4bit(), fastq.Spec4bit("fp4", 4096, False), fastq.SPEC_INT8])
def test_quantize_non_finite(tmp_path, bad, spec):
    ts = {"ok": torch.randn(8, 64), "w": torch.randn(300, 300).to(torch.bfloat16)}
    ts["w"][123, 45] = bad
    path = str(tmp_path / "m.safetensors")
    save_file(ts, path)
    ck = fastq.open(path)
    it = ck.quantize([("ok", spec), ("w", spec)])
    assert next(it)[0] == "ok"  # the good tensor before the bad one comes through
    with pytest.raises(fastq.NonFiniteError) as e:
        next(it)
    assert e.value.path == path and e.value.tensor == "w"
    assert f"element {123 * 300 + 45}" in str(e.value)


def test_int8_of_1d_tensor_is_a_shape_error(single):
    path, _ = single
    with pytest.raises(fastq.ShapeError) as e:
        fastq.open(path).quantize_all([("model.layers.0.norm.weight", "int8")])
    assert e.value.tensor == "model.layers.0.norm.weight" and e.value.path == path


def test_bad_spec(single):
    path, _ = single
    ck = fastq.open(path)
    with pytest.raises(fastq.InvalidArgumentError):
        ck.quantize_all([("lm_head.weight", fastq.Spec4bit(blocksize=48))])
    with pytest.raises(fastq.InvalidArgumentError):
        ck.quantize_all([("lm_head.weight", fastq.Spec4bit(quant_type="int4"))])


# ---------------------------------------------------------------------------------------------- GIL


def main_thread_progress(call) -> tuple[float, int, float]:
    """Runs ``call`` in a thread while this thread keeps running Python code (in the style of
    safetensors' tests/test_threadable.py). Returns the call's duration, the iterations this thread made
    during it, and the longest this thread went without one while the call ran."""
    span = {}
    started = threading.Event()

    def worker():
        started.set()
        t0 = time.perf_counter()
        call()
        span["t"] = (t0, time.perf_counter())

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # hand the GIL over quickly whenever it is free
    stamps = []
    try:
        th = threading.Thread(target=worker)
        th.start()
        started.wait()
        while th.is_alive():
            stamps.append(time.perf_counter())
            sum(i * i for i in range(50))  # plain Python work, which needs the GIL
        th.join()
    finally:
        sys.setswitchinterval(old)
    t0, t1 = span["t"]
    inside = [s for s in stamps if t0 <= s <= t1]
    gaps = [b - a for a, b in zip([t0, *inside], [*inside, t1], strict=True)]
    return t1 - t0, len(inside), max(gaps)


def assert_gil_released(duration: float, iterations: int, max_gap: float) -> None:
    # Holding the GIL for the whole call would leave no iteration inside it and one gap as long as it.
    assert duration > 0.05, f"the call took only {duration:.3f} s; too short to tell"
    assert iterations > 100, f"main thread ran {iterations} iterations in {duration:.3f} s"
    assert max_gap < 0.5 * duration, f"main thread stalled {max_gap:.3f} s of {duration:.3f} s"


def test_gil_measurement_sees_a_held_gil():
    """The control: a call that keeps the GIL (list.sort) stalls this thread for most of its run."""
    data = torch.randn(1_500_000, generator=torch.Generator().manual_seed(3)).tolist()
    duration, _, max_gap = main_thread_progress(lambda: sorted(data))
    assert duration > 0.05 and max_gap > 0.5 * duration


def test_gil_released_by_ops():
    t = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert_gil_released(*main_thread_progress(lambda: fastq.ops.quantize_4bit(t, reference=True, threads=1)))


def test_gil_released_by_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(2)
    ts = {f"w{i}": torch.randn(2048, 4096, generator=g) for i in range(4)}
    path = str(tmp_path / "big.safetensors")
    save_file(ts, path)
    ck = fastq.open(path)
    jobs = [(n, fastq.Spec4bit()) for n in ts] + [(n, fastq.Spec4bit("fp4", 32, False)) for n in ts]

    def run():
        # Repeated so the call lasts long enough to measure, however fast the kernels get.
        for _ in range(6):
            for n, (packed, _) in ck.quantize(jobs[:4], threads=1):
                assert packed.numel() == ts[n].numel() // 2
            ck.quantize_all(jobs[4:], threads=1)
        _fastq.Checkpoint(path)  # opening (mapping, header checks) releases it too

    assert_gil_released(*main_thread_progress(run))
