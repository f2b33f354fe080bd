"""Writes the CUDA reference for fastq's byte-for-byte tests (run on the GPU machine).

bitsandbytes' CPU kernel for the nested 8-bit step of double quantization rounds through a lookup
table and disagrees with its CUDA kernel on ~0.2% of codes; fastq follows the CUDA kernel. This script
records what the CUDA kernels write so tests/test_quantize_bnb.py can compare without a GPU.

    python3 benches/gpu/make_nested_fixture.py OUT_DIR

Writes OUT_DIR/bnb_cuda_nested.safetensors with, for each case i:
  case{i}.input  float32  the (absmax - offset) vector fed to the nested step
  case{i}.codes  uint8    CUDA quantize_blockwise(input, blocksize=256) codes
  case{i}.absmax float32  its absmax per 256 values
and for each weight j (4-bit and int8 written by the CUDA kernels, for the record):
  w{j}.weight bf16; w{j}.nf4 / w{j}.fp4 uint8 packed codes; w{j}.nf4_absmax / w{j}.fp4_absmax float32;
  w{j}.CB int8; w{j}.SCB float32
and the double-quant offset as the GPU computes it (torch's CUDA float32 ``mean()``) of long vectors, whose
summation order is what fastq's CPU offset (rust/core/quant/cuda_mean.rs) follows:
  means.sizes int64, means.values float32: ``mean_inputs(n)`` on the GPU, for n in ``MEAN_SIZES``
The metadata records the GPU, its SM count and threads per SM (the order depends on them only above
8192 x SMs x threads per SM / 512 values). The case weights come from ``case_weights()`` and the mean
inputs from ``mean_inputs``, so the tests regenerate both on the CPU instead of storing them.
"""

import json
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

#: Lengths of the mean cases: short ones on each side of the kernel's launch thresholds (128 values: groups
#: of four; 2048: blocks of 512 threads; a tail of 1-3), the absmax of 7B weights (4096 x 4096 and
#: 4096 x 11008 with blocksize 64), a 70B MLP weight's (8192 x 28672), and lengths past 4.3 million, where
#: an H100's or H200's SM count bounds the number of blocks.
MEAN_SIZES = [1, 3, 64, 127, 128, 131, 1000, 2047, 2049, 65536, 65539, 262144, 262144, 704512, 704512,
              704512, 1000003, 3670016, 4325376, 4325377, 5000000, 13631488]


def case_weights(g: torch.Generator):
    """The weights whose absmax feed cases 0-3, drawn from ``g`` (seeded 1234) in this order."""
    for rows, cols, scale in [(512, 1000, 0.02), (1024, 4096, 1.0), (333, 777, 50.0), (64, 64, 1e-3)]:
        yield (torch.randn(rows, cols, generator=g) * scale).to(torch.bfloat16)


def mean_inputs(g: torch.Generator, n: int) -> torch.Tensor:
    """An absmax-like float32 vector of ``n`` values (0.01 to 0.06), drawn from ``g`` on the CPU."""
    return torch.rand(n, generator=g) * 0.05 + 0.01


def main(out_dir: str) -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1234)
    tensors = {}
    # Nested-step inputs as double quantization produces them, from weights of several scales.
    for i, w in enumerate(case_weights(g)):
        w = w.to(dev)
        _, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
        inp = absmax - absmax.mean()
        codes, st = F.quantize_blockwise(inp, blocksize=256)
        tensors[f"case{i}.input"] = inp.cpu()
        tensors[f"case{i}.codes"] = codes.cpu()
        tensors[f"case{i}.absmax"] = st.absmax.float().cpu()
    # Edge cases fed straight to the nested step: a zero block, exact map entries and midpoints.
    code = F.create_dynamic_map(signed=True).to(dev)
    mids = (code[:-1] + code[1:]) / 2
    edge = torch.cat([torch.zeros(256, device=dev), code, mids, -mids, torch.linspace(-1, 1, 1001, device=dev)])
    codes, st = F.quantize_blockwise(edge.float(), blocksize=256)
    n = len(tensors) // 3
    tensors[f"case{n}.input"] = edge.float().cpu()
    tensors[f"case{n}.codes"] = codes.cpu()
    tensors[f"case{n}.absmax"] = st.absmax.float().cpu()
    # Whole 4-bit and int8 weights written by the CUDA kernels.
    for j, (rows, cols) in enumerate([(128, 515), (96, 64), (33, 300)]):
        w = (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"w{j}.weight"] = w
        for qt in ("nf4", "fp4"):
            packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w.to(dev), 64, qt, torch.uint8)
            tensors[f"w{j}.{qt}"] = packed.cpu().reshape(-1)
            tensors[f"w{j}.{qt}_absmax"] = absmax.float().cpu()
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to(dev)
        tensors[f"w{j}.CB"] = p.CB.cpu()
        tensors[f"w{j}.SCB"] = p.SCB.cpu()
    gm = torch.Generator(device="cpu").manual_seed(4321)
    means = [mean_inputs(gm, n).to(dev).mean() for n in MEAN_SIZES]
    tensors["means.sizes"] = torch.tensor(MEAN_SIZES, dtype=torch.int64)
    tensors["means.values"] = torch.stack(means).cpu()
    props = torch.cuda.get_device_properties(dev)
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "sms": str(props.multi_processor_count),
            "threads_per_sm": str(getattr(props, "max_threads_per_multi_processor", 0))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/bnb_cuda_nested.safetensors", metadata=meta)
    print(json.dumps(meta), len(tensors), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
