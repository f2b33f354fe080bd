"""Where fastq's CPU double quantization differs from bitsandbytes on the GPU, code by code (run on the GPU
machine after compare.py made its checkpoint):

    python3 benches/gpu/nested_diff.py --work /tmp/fastq-gpu --out $OUT

Loads the 7B-shaped checkpoint twice in NF4 + double quant: transformers + bitsandbytes (quantized on the
GPU) and ``fastq.load(..., quantize_on="cpu")`` (fastq's Rust kernels); for every module whose nested
absmax codes differ, each differing code: the value the nested step quantizes (the GPU's float32 absmax of
that 64-value block minus the offset, times the reciprocal of its 256-block's nested absmax), the two
codes, and where the value lies between them (the midpoint of the two code values, and whether the value
equals it: a tie the GPU's approximate reciprocal may put on either side). Prints a summary; writes
``nested_diff.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fastq-gpu")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from compare import make_checkpoint

    ckpt = Path(a.work) / "llama7b"
    make_checkpoint(ckpt, 32)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import fastq
    import torch
    import transformers
    from safetensors import safe_open

    kw = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
          "bnb_4bit_compute_dtype": torch.bfloat16}
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, quantization_config=transformers.BitsAndBytesConfig(**kw), device_map={"": 0}, dtype=torch.bfloat16)
    got = fastq.load(ckpt, transformers.BitsAndBytesConfig(**kw), {"": 0}, dtype=torch.bfloat16,
                     quantize_on="cpu", progress=False)
    shard_of = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    rows, modules = [], 0
    for name, m in ref.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        modules += 1
        qa, qb = m.weight.quant_state, got.get_submodule(name).weight.quant_state
        same = {"offset": bool(torch.equal(qa.offset.cpu(), qb.offset.cpu())),
                "nested_absmax": bool(torch.equal(qa.state2.absmax.cpu(), qb.state2.absmax.cpu()))}
        codes_a, codes_b = qa.absmax.cpu(), qb.absmax.cpu()
        if torch.equal(codes_a, codes_b) and all(same.values()):
            continue
        with safe_open(ckpt / shard_of[f"{name}.weight"], "pt", device="cuda:0") as f:
            w = f.get_tensor(f"{name}.weight")
        _, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        x = (st.absmax - qa.offset).float().cpu()
        nab = qa.state2.absmax.float().cpu()
        code = qa.state2.code.float().cpu()
        idx = (codes_a != codes_b).nonzero().flatten().tolist()
        diffs = []
        for i in idx[:50]:
            blk = i // qa.state2.blocksize
            v = (x[i] * (1 / nab[blk])).item()
            ca, cb = int(codes_a[i]), int(codes_b[i])
            mid = ((code[ca] + code[cb]) / 2).item()
            diffs.append({"index": i, "value": v, "exact_div": (x[i] / nab[blk]).item(), "gpu_code": ca,
                          "cpu_code": cb, "gpu_code_value": code[ca].item(), "cpu_code_value": code[cb].item(),
                          "midpoint": mid, "tie": v == mid, "ulps_from_midpoint": _ulps(v, mid)})
        rows.append({"module": name, "codes_differ": len(idx), "of": codes_a.numel(), **same, "diffs": diffs})
    out = {"modules": modules, "differing": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "nested_diff.json").write_text(json.dumps(out, indent=1))
    print(f"{len(rows)} of {modules} modules differ")
    for r in rows:
        ties = sum(d["tie"] for d in r["diffs"])
        ulps = [d["ulps_from_midpoint"] for d in r["diffs"]]
        print(f"  {r['module']}: {r['codes_differ']} of {r['of']} nested codes; offset same {r['offset']}, "
              f"nested absmax same {r['nested_absmax']}; exact ties {ties}/{len(r['diffs'])}, "
              f"float32 ulps from the midpoint {ulps[:10]}")
        for d in r["diffs"][:3]:
            print("   ", json.dumps(d))


def _ulps(a: float, b: float) -> int:
    import struct

    ia, ib = (struct.unpack("<i", struct.pack("<f", v))[0] for v in (a, b))
    return abs(ia - ib)


if __name__ == "__main__":
    main()
