"""``fastq.load`` against transformers + bitsandbytes on the CPU, side by side in one run.

A 1.1B-parameter bf16 Llama (TinyLlama's shape, 2.2 GB in 3 shards, random weights; the same
checkpoint as benches/bench_convert.py) is loaded in NF4 + double quant (bf16 compute) and in
LLM.int8, by ``fastq.load`` and by ``transformers.AutoModelForCausalLM.from_pretrained``, each in a
fresh subprocess from a warm page cache, imports excluded. Each reports the load time, the peak
resident memory above the process's baseline after imports (VmHWM - VmRSS before loading), and the
time of a forward pass over 128 tokens (median of 3, after one warm-up pass: bitsandbytes repacks 4-bit
weights for its CPU kernel on the first pass).

Usage: python benches/bench_load.py [--repeat 3] [--cases fq_nf4 tf_nf4 fq_int8 tf_int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert as bc

SRC = bc.BASE / "load" / "llama-1.1b"


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(case: str) -> dict:
    import fastq
    import torch
    import transformers

    # Imports both loaders make lazily, done before the clock starts.
    import transformers.integrations.bitsandbytes
    import transformers.models.llama.modeling_llama
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer  # noqa: F401
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer  # noqa: F401

    cfgs = {
        "nf4": transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        "int8": transformers.BitsAndBytesConfig(load_in_8bit=True),
    }
    who, kind = case.split("_")
    base = _status_mb("VmRSS")
    t = time.perf_counter()
    if who == "fq":
        model = fastq.load(SRC, cfgs[kind], "cpu", dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            SRC, quantization_config=cfgs[kind], device_map="cpu", dtype=torch.bfloat16
        )
    load_s = time.perf_counter() - t
    peak = _status_mb("VmHWM") - base
    ids = (torch.arange(128) * 37 % 32000).unsqueeze(0)
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(3):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return {"case": case, "load_s": load_s, "peak_mb": peak, "base_mb": base, "forward_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=["fq_nf4", "tf_nf4", "fq_int8", "tf_int8"])
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    bc.ensure_checkpoint(SRC, 22, 3)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; checkpoint {SRC}")
    print("| case | load s (median of runs) | all runs | peak RSS above baseline MB | forward 128 tok s |")
    print("| --- | ---: | --- | ---: | ---: |")
    for case in args.cases:
        runs = []
        for _ in range(args.repeat if case.startswith("fq") else 1):
            bc.warm(SRC)
            out = subprocess.run([sys.executable, __file__, "--child", case], check=True, capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        med = statistics.median(r["load_s"] for r in runs)
        all_runs = ", ".join(f"{r['load_s']:.2f}" for r in runs)
        print(f"| {case} | {med:.2f} | {all_runs} | "
              f"{max(r['peak_mb'] for r in runs):.0f} | {statistics.median(r['forward_s'] for r in runs):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
