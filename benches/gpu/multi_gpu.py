"""A quantized model spread over several GPUs by the device map, fastq vs transformers + bitsandbytes, in
one run (for a machine of 2+ GPUs; the multi-GPU issue):

    python3 benches/gpu/multi_gpu.py --work /tmp/fastq-gpu --out $OUT [--cases ...]

Uses compare.py's 7B-shaped checkpoint (made if missing). Each case runs in a fresh process: NF4 + double
quant and LLM.int8 with device_map "auto", "balanced" and a max_memory that forces a split. It records
the load time, where the modules landed (modules per device), each device's allocated bytes against
its budget, and greedy tokens, compared at the end with the one-GPU load of the same config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

CASES = [f"{lib}_{q}_{dm}" for q in ("nf4", "int8") for dm in ("one", "auto", "balanced", "split") for lib in ("tf", "fq")]


def run_case(case: str, ckpt: Path) -> dict:
    import accelerate  # noqa: F401 - imports excluded from the timing
    import bitsandbytes  # noqa: F401
    import fastq
    import torch
    import transformers

    lib, quant, dm = case.split("_")
    cfg = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)
           if quant == "nf4" else transformers.BitsAndBytesConfig(load_in_8bit=True))
    n = torch.cuda.device_count()
    budget = {i: "2GiB" if quant == "nf4" else "4GiB" for i in range(n)}  # forces a split of a 3.9/7 GB model
    device_map, max_memory = {"one": ({"": 0}, None), "auto": ("auto", None), "balanced": ("balanced", None),
                              "split": ("auto", budget)}[dm]
    for i in range(n):
        torch.zeros(1, device=f"cuda:{i}")
    torch.cuda.synchronize()
    t = time.perf_counter()
    if lib == "tf":
        m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=cfg, device_map=device_map,
                                                              max_memory=max_memory, dtype=torch.bfloat16)
    else:
        m = fastq.load(ckpt, cfg, device_map, max_memory=max_memory, dtype=torch.bfloat16, progress=False)
    for i in range(n):
        torch.cuda.synchronize(i)
    load_s = time.perf_counter() - t
    hf_map = getattr(m, "hf_device_map", {"": 0})
    ids = torch.arange(1, 9, device="cuda:0").unsqueeze(0) * 37 % 32000
    with torch.no_grad():
        tokens = m.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 8:].tolist()
    allocated = {i: torch.cuda.memory_allocated(i) for i in range(n)}
    limits = {i: _bytes(budget[i]) for i in range(n)} if max_memory else None
    return {"case": case, "load_s": load_s, "devices": dict(Counter(str(v) for v in hf_map.values())),
            "allocated_gb": {i: a / 1e9 for i, a in allocated.items()},
            "within_budget": None if limits is None else all(allocated[i] <= limits[i] for i in range(n)),
            "tokens": tokens}


def _bytes(s: str) -> int:
    return int(float(s.removesuffix("GiB")) * 2**30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fastq-gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", nargs="*", default=CASES)
    ap.add_argument("--case")
    a = ap.parse_args()
    ckpt = Path(a.work) / "llama7b"
    if a.case:
        print("RESULT " + json.dumps(run_case(a.case, ckpt)), flush=True)
        return
    from compare import make_checkpoint, warm

    make_checkpoint(ckpt, 32)
    warm(ckpt)
    results = {}
    for case in a.cases:
        p = subprocess.run([sys.executable, __file__, "--work", a.work, "--case", case], capture_output=True,
                           text=True, timeout=900, check=False)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{case} FAILED rc={p.returncode}\n{p.stderr[-2000:]}", flush=True)
            continue
        results[case] = json.loads(line[0][7:])
        print(json.dumps(results[case]), flush=True)
    Path(a.out, "multi_gpu.json").write_text(json.dumps(results, indent=1))
    for case, r in results.items():
        one = results.get(case.rsplit("_", 1)[0] + "_one")
        same = one is not None and one["tokens"] == r["tokens"]
        print(f"{case:<16} {r['load_s']:6.2f}s devices {r['devices']} allocated {r['allocated_gb']} "
              f"budget ok {r['within_budget']} same tokens as one GPU {same}")


if __name__ == "__main__":
    main()
