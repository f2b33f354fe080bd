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
"""

import json
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file


def main(out_dir: str) -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1234)
    tensors = {}
    # Nested-step inputs as double quantization produces them, from weights of several scales.
    for i, (rows, cols, scale) in enumerate([(512, 1000, 0.02), (1024, 4096, 1.0), (333, 777, 50.0), (64, 64, 1e-3)]):
        w = (torch.randn(rows, cols, generator=g) * scale).to(torch.bfloat16).to(dev)
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
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/bnb_cuda_nested.safetensors", metadata=meta)
    print(json.dumps(meta), len(tensors), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
