"""Range jobs (``_fastq.Job.four_bit(..., range=(start, end))``, FSDP's share: python/fastq/shard.py)
through ``Checkpoint.quantize``: the packed bytes and absmax of elements ``start..end`` of a checkpoint
weight equal bitsandbytes 0.50.2's ``quantize_4bit`` of that slice in NF4 (its CPU kernel agrees with
its CUDA one there; see tests/test_quantize_bnb.py) and fastq's whole-tensor quantization of it in FP4
(the CUDA kernel's, from which the CPU kernel differs), for every input dtype and storage, cast or
not; bad ranges are refused naming the tensor (and the file, once the job meets the checkpoint)."""

from __future__ import annotations

import bitsandbytes.functional as F
import fastq
import pytest
import torch
from conftest import tensor_bytes
from fastq import _fastq
from safetensors.torch import save_file


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(257, 311, generator=g) * 0.05  # 79927 elements: odd, the last block partial
    w[3, :7] = 0.0
    path = tmp_path / "m.safetensors"
    save_file({f"w.{d}": w.to(getattr(torch, d)) for d in ("float32", "float16", "bfloat16")}, str(path))
    return str(path), w.numel()


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_range_job_equals_bnb_on_the_slice(weights, dtype, quant_type, storage):
    path, n = weights
    ck = fastq.open(path)
    name = f"w.{dtype}"
    flat = ck.get(name).reshape(-1)
    st_storage = {torch.uint8: "U8", torch.bfloat16: "BF16"}[storage]
    for blocksize, (start, end) in [(64, (0, 64 * 600)), (64, (64 * 17, 64 * 1000)), (64, (64 * 1000, n + 1)),
                                    (256, (256 * 3, 256 * 200))]:
        job = _fastq.Job.four_bit(name, quant_type, blocksize, double_quant=False, storage=st_storage,
                                  range=(start, end))
        assert job.range == (start, end) and f"range=({start}, {end})" in repr(job)
        [(got_name, (packed, state))] = list(ck.quantize([job]))
        x = flat[start : min(end, n)]
        if quant_type == "nf4":
            ref, rstate = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False,
                                          quant_storage=storage)
        else:  # FP4 follows the CUDA kernel, not bitsandbytes' CPU one: the slice quantized whole
            ref, rstate = fastq.ops.quantize_4bit(x, blocksize, quant_type, False, quant_storage=storage)
        assert got_name == name and packed.dtype == storage
        assert torch.equal(tensor_bytes(packed), tensor_bytes(ref)), (start, end)
        assert torch.equal(tensor_bytes(state.absmax), tensor_bytes(rstate.absmax)), (start, end)
        assert tuple(state.shape) == (x.numel(),) and state.dtype == x.dtype


def test_cast_range_job_equals_bnb_on_the_cast_slice(weights):
    """A cast job (transformers casts a weight to the model's dtype first) casts, then takes the range."""
    path, _ = weights
    ck = fastq.open(path)
    job = _fastq.Job.four_bit("w.float32", "nf4", 64, double_quant=False, cast="BF16", range=(64 * 40, 64 * 900))
    [(_, (packed, state))] = list(ck.quantize([job]))
    x = ck.get("w.float32").reshape(-1)[64 * 40 : 64 * 900].to(torch.bfloat16)
    ref, rstate = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(tensor_bytes(packed), tensor_bytes(ref))
    assert torch.equal(tensor_bytes(state.absmax), tensor_bytes(rstate.absmax)) and state.dtype == torch.bfloat16


def test_bad_ranges_are_refused_naming_the_tensor(weights):
    path, n = weights
    with pytest.raises(fastq.ShapeError, match="double_quant=False") as e:
        _fastq.Job.four_bit("w.float32", range=(0, 64))  # double quant is on by default
    assert e.value.tensor == "w.float32"
    with pytest.raises(fastq.ShapeError, match="block boundary"):
        _fastq.Job.four_bit("w.float32", double_quant=False, range=(32, 128))
    with pytest.raises(fastq.ShapeError, match="transposed"):
        _fastq.Job.four_bit("w.float32", double_quant=False, transpose=True, range=(0, 64))
    ck = fastq.open(path)
    outside = _fastq.Job.four_bit("w.float32", double_quant=False, range=(n // 64 * 64 + 64, n + 200))
    with pytest.raises(fastq.ShapeError, match="outside the tensor") as e:
        list(ck.quantize([outside]))
    assert (e.value.path, e.value.tensor) == (path, "w.float32")
    assert _fastq.Job.four_bit("w.float32").range is None
