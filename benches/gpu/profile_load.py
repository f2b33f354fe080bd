"""Where fastq.load's time goes on the GPU machine (run after compare.py made the checkpoint).

    python3 benches/gpu/profile_load.py /tmp/fastq-gpu/llama7b
    python3 benches/gpu/profile_load.py --reload /tmp/fastq-gpu/llama7b-nf4   # after compare.py's fq_convert

Prints: 16-thread pread bandwidth of the shards, the Rust pipeline alone (NF4 + double quant, results
dropped), the pipeline with each result copied to the GPU, and a cProfile of fastq.load.

``--reload``: a pre-quantized (or plain) checkpoint loaded with no quantization config, the case whose
critical path is the skeleton (BENCHMARKS run 15): three loads in this process with their phases, then
a cProfile of a fourth, by cumulative time.
"""

import cProfile
import os
import pstats
import sys
import threading
import time
from pathlib import Path

import fastq
import torch


def pread_bw(files, threads=16, chunk=8 << 20):
    jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), chunk)]
    total = sum(os.path.getsize(f) for f in files)
    lock = threading.Lock()

    def work():
        buf = bytearray(chunk)
        fds = {}
        while True:
            with lock:
                if not jobs:
                    break
                f, off = jobs.pop()
            fd = fds.setdefault(f, os.open(f, os.O_RDONLY))
            os.preadv(fd, [buf], off)
        for fd in fds.values():
            os.close(fd)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return total / (time.perf_counter() - t) / 1e9


def main(path):
    files = sorted(str(p) for p in Path(path).glob("*.safetensors"))
    print(f"pread 16 threads: {pread_bw(files):.1f} GB/s; 1 thread: {pread_bw(files, 1):.1f} GB/s", flush=True)
    ck = fastq.open(path)
    names = [k for k in ck if k.endswith("proj.weight")]
    nb = sum(ck.meta(k).nbytes for k in names)
    spec = fastq.Spec4bit("nf4", 64, True)
    for label, to_gpu in (("pipeline", False), ("pipeline+H2D", True)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _, (packed, state) in ck.quantize([(n, spec) for n in names]):
            if to_gpu:
                packed.to("cuda")
                state.to("cuda")
        torch.cuda.synchronize()
        d = time.perf_counter() - t
        print(f"{label}: {d:.2f} s, {nb / d / 1e9:.1f} GB/s of bf16 input", flush=True)
    import transformers

    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    fastq.load(path, cfg, {"": 0}, dtype=torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    pr.disable()
    print(f"fastq.load: {time.perf_counter() - t:.2f} s", flush=True)
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def reload(path):
    for k in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        m = fastq.load(path, None, {"": 0}, dtype=torch.bfloat16, progress=False)
        torch.cuda.synchronize()
        phases = fastq.transfer.LAST_TIMELINE.timeline.phases()
        print(f"reload {k}: {time.perf_counter() - t:.3f} s; "
              + " ".join(f"{p}={v:.3f}" for p, v in phases.items()), flush=True)
        del m
        torch.cuda.empty_cache()
    pr = cProfile.Profile()
    pr.enable()
    fastq.load(path, None, {"": 0}, dtype=torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    if sys.argv[1] == "--reload":
        reload(sys.argv[2])
    else:
        main(sys.argv[1])
