"""fastq.load on a GPU against transformers + bitsandbytes on the same GPU: byte for byte, no tolerance.

Weights bound for a GPU are quantized there by bitsandbytes' own CUDA kernels (quantize_on="device",
the default), so every packed weight, absmax, nested code, double-quant offset and int8 CB/SCB must be
the bytes transformers gives, and the logits identical. Pre-quantized and plain checkpoints take the
same pinned ring. Skipped without a CUDA device (CI has none); run on the lent GPU machine by
benches/gpu/run.sh.
"""

from __future__ import annotations

import gc
import json
import shutil
import threading

import fastq
import pytest
import torch
import transformers
from conftest import auto_class

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE = torch.bfloat16
CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": DTYPE},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
               "bnb_4bit_compute_dtype": DTYPE},
    "nf4-dq-bf16-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                            "bnb_4bit_quant_storage": DTYPE},
    "int8": {"load_in_8bit": True},
}
FAMILIES = ["llama", "gpt2", "opt", "bloom", "bert", "t5"]
MATRIX = [(f, c) for f in FAMILIES for c in CONFIGS]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _outputs(model, family: str):
    ids = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    kw = {"input_ids": ids}
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        out = model(**kw)
    return out.last_hidden_state if family == "bert" else out.logits


def assert_identical(ref, got, family: str) -> None:
    sa, sb = ref.state_dict(), got.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        a, b = sa[k], sb[k]
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, k
        assert torch.equal(_bytes(a), _bytes(b)), f"{k} differs"
    assert torch.equal(_outputs(ref, family), _outputs(got, family))


def reload_prequantized(folder, pre, name: str):
    """transformers quantizes ``folder`` on the GPU (``CONFIGS[name]``) and saves it to ``pre``; fastq's
    reload of ``pre`` is checked identical to transformers' reload; returns both, (transformers, fastq)."""
    cfg = transformers.BitsAndBytesConfig(**CONFIGS[name])
    auto_class("llama").from_pretrained(folder, quantization_config=cfg, device_map={"": 0}, dtype=DTYPE) \
        .save_pretrained(pre)
    ref = auto_class("llama").from_pretrained(pre, device_map={"": 0}, dtype=DTYPE)
    got = fastq.load(pre, None, {"": 0}, dtype=DTYPE, progress=False)
    assert_identical(ref, got, "llama")
    return ref, got


@pytest.mark.parametrize(("family", "name"), MATRIX, ids=[f"{f}-{c}" for f, c in MATRIX])
def test_quantized_on_the_gpu_is_transformers_byte_for_byte(tiny_model, family, name):
    folder = tiny_model(family)
    cfg = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = auto_class(family).from_pretrained(folder, quantization_config=cfg, device_map={"": 0}, dtype=DTYPE)
    got = fastq.load(folder, transformers.BitsAndBytesConfig(**CONFIGS[name]), {"": 0}, dtype=DTYPE, progress=False)
    assert_identical(ref, got, family)


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_float32_checkpoint_cast_then_quantized_on_the_gpu(tiny_model, name):
    folder = tiny_model("llama", torch.float32)
    cfg = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = auto_class("llama").from_pretrained(folder, quantization_config=cfg, device_map={"": 0}, dtype=DTYPE)
    got = fastq.load(folder, transformers.BitsAndBytesConfig(**CONFIGS[name]), {"": 0}, dtype=DTYPE, progress=False)
    assert_identical(ref, got, "llama")


@pytest.mark.parametrize("early", [True, False], ids=["early-reads", "reads-after-plan"])
@pytest.mark.parametrize("name", ["nf4-dq", "fp4", "int8"])
def test_prequantized_and_plain_checkpoints_through_the_ring(tiny_model, tmp_path, name, early, monkeypatch):
    """Pre-quantized and plain loads every way: their bytes streamed while the skeleton is built
    (early_reads.EarlyReads, the default: the Rust upload) or once the plan is made - the same model as
    transformers each way."""
    import fastq.early_reads
    import fastq.loader

    monkeypatch.setattr(fastq.early_reads, "EARLY_READS", early)
    started, real = [], fastq.loader.start_early_reads
    monkeypatch.setattr(fastq.loader, "start_early_reads", lambda *a, **k: started.append(real(*a, **k)) or started[-1])
    folder = tiny_model("llama")
    reload_prequantized(folder, tmp_path / "pre", name)
    plain_ref = auto_class("llama").from_pretrained(folder, device_map={"": 0}, dtype=DTYPE)
    plain = fastq.load(folder, None, {"": 0}, dtype=DTYPE, progress=False)
    assert_identical(plain_ref, plain, "llama")
    assert [s is not None for s in started] == [early] * 2  # the pre-quantized load's, the plain one's


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_a_gpu_load_whose_tensors_share_blocks_saves_as_transformers_does(tiny_model, tmp_path, name):
    """A pre-quantized reload (every tensor kept as read: neighbours in a slot are views of one device
    block, transfer.Request.shared) saved by ``fastq.save`` and by transformers' ``save_pretrained``:
    the tensors of the checkpoint it was loaded from, byte for byte, and they load back identical."""
    from safetensors.torch import load_file

    ref, got = reload_prequantized(tiny_model("llama"), tmp_path / "pre", name)
    ptrs = {}
    for p in got.state_dict().values():
        ptrs.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    assert max(len(v) for v in ptrs.values()) > 1  # the case this test is for: tensors sharing a block
    got.save_pretrained(tmp_path / "tf")  # (transformers 5.17 cannot save its own pre-quantized reload:
    fastq.save(got, tmp_path / "fq")  # Bnb4bitDeserialize has no reverse op; the reference is the checkpoint)
    want = load_file(tmp_path / "pre" / "model.safetensors")
    for out in ("tf", "fq"):
        have = load_file(tmp_path / out / "model.safetensors")
        assert sorted(have) == sorted(want), out
        assert all(torch.equal(_bytes(have[k]), _bytes(want[k])) for k in want), out
        assert_identical(ref, fastq.load(tmp_path / out, None, {"": 0}, dtype=DTYPE, progress=False), "llama")


def test_a_load_failing_after_its_early_reads_started_stops_them(tiny_model, tmp_path):
    """A checkpoint that lacks a layer its config.json asks for fails at the plan, after the early reads
    began: the error names it, the reads' thread has ended and their buffers are freed."""

    folder = tmp_path / "more-layers"
    shutil.copytree(tiny_model("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(cfg))
    gc.collect()  # what earlier tests left
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(fastq.FastqError, match="no tensor for"):
        fastq.load(folder, None, {"": 0}, dtype=DTYPE, progress=False)
    assert not [t for t in threading.enumerate() if t.name == "fastq-early-reads"]
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_the_rust_upload_streams_every_byte_through_the_pinned_ring_and_stops_cleanly(tmp_path):
    """early_reads.EarlyReads on the Rust engine (_fastq.Upload: reads, copies on the driver's stream,
    slots recycled on its events) with 250 MB through the 4 x 64 MiB ring: every tensor lands, small ones
    in shared blocks; an upload cancelled after its first tensor ends, hands the ring back and frees
    its buffers; an upload started where no CUDA context is current is a DeviceError saying so."""
    from fastq import early_reads, transfer
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    sizes = [5, 3 << 20, 100, 150 << 20, 7, 90 << 20, 33]
    tensors = {f"t{k}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8) for k, n in enumerate(sizes)}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = fastq.open(tmp_path / "model.safetensors")
    dev = torch.device("cuda", 0)
    timeline = transfer.Timeline()
    early = early_reads.EarlyReads(ck, dev, ck.keys(), timeline=timeline)
    got = dict(early.arrivals())
    for name, t in tensors.items():
        assert got[name].device == dev and torch.equal(got[name].cpu(), t), name
    assert timeline.summary()["copy"]["GB"] * 1e9 >= sum(sizes)
    del got
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    early = early_reads.EarlyReads(ck, dev, ck.keys())
    it = early.arrivals()
    next(it)
    early.cancel()
    assert not transfer.ring_for().lock.locked()
    del it, early
    gc.collect()
    assert torch.cuda.memory_allocated() == before
    ring, out, errors = transfer.ring_for(), torch.empty(sizes[0], dtype=torch.uint8, device=dev), []

    def start() -> None:  # a fresh thread: no CUDA context current on it until a CUDA call binds one
        try:
            fastq._fastq.Upload(ck.native, [(out.data_ptr(), sizes[0], [("t0", 0, sizes[0], 0)])],
                                [ring.array(0)], transfer.copy_stream(dev).cuda_stream)
        except fastq.FastqError as e:
            errors.append(e)

    with ring.lock:
        t = threading.Thread(target=start)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], fastq.DeviceError) and "no current CUDA context" in str(errors[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_on_cpu_gives_the_gpus_bytes(tiny_model, name):
    """fastq's CPU kernels against transformers quantizing on this GPU, every configuration: the blocks and
    int8 rows scaled by the GPU's reciprocal (rust/core/quant/reciprocal.rs), the double-quant offset
    summed as torch's CUDA ``mean()`` (cuda_mean.rs), the nested codes rounded as the CUDA kernel - so
    every byte is the GPU's, FP4's ties and int8's CB included."""
    folder = tiny_model("llama")
    cfg = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = auto_class("llama").from_pretrained(folder, quantization_config=cfg, device_map={"": 0}, dtype=DTYPE)
    got = fastq.load(folder, cfg, {"": 0}, dtype=DTYPE, progress=False, quantize_on="cpu")
    assert_identical(ref, got, "llama")


def test_the_ring_records_a_timeline_of_overlapping_stages(tiny_model):
    fastq.load(tiny_model("llama"), transformers.BitsAndBytesConfig(**CONFIGS["nf4-dq"]), {"": 0}, dtype=DTYPE,
               progress=False)
    s = fastq.transfer.LAST_TIMELINE.timeline.summary()
    assert s["read"]["GB"] == s["copy"]["GB"] > 0
    assert s["device"]["busy_s"] > 0
