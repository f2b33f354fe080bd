"""The per-call cost of opening a checkpoint and reading it in place: ``fastq.open``, ``get`` of every
tensor, ``populate`` of every tensor, ``check`` (when the build has it) and a streaming quantization,
each the median of several runs from a warm page cache. Used to time the SIGBUS guard and the check
points (BENCHMARKS.md, "Files that change underneath"): run it against two builds with PYTHONPATH.

    PYTHONPATH=python python3 benches/bench_open.py [--small 4000] [--large 8] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import fastq
import torch
from safetensors.torch import save_file


def make(folder: Path, small: int, large: int) -> Path:
    g = torch.Generator().manual_seed(0)
    ts = {f"small.{i:05d}": torch.randn(64, generator=g) for i in range(small)}
    ts.update({f"large.{i:02d}.weight": torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
               for i in range(large)})
    path = folder / "model.safetensors"
    save_file(ts, path, metadata={"format": "pt"})
    return path


def median_ms(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=4000, help="tensors of 64 floats")
    ap.add_argument("--large", type=int, default=8, help="4096 x 4096 bf16 tensors (32 MiB each)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = make(Path(d), args.small, args.large)
        path.read_bytes()  # warm the page cache
        ck = fastq.open(path)
        names = ck.keys()
        large = [n for n in names if n.startswith("large")]
        rows = {
            "open": median_ms(lambda: fastq.open(path), args.repeat),
            f"get x{len(names)}": median_ms(lambda: [ck.get(n) for n in names], args.repeat),
            f"populate x{len(names)}": median_ms(lambda: ck.populate(names), args.repeat),
        }
        if hasattr(ck, "check"):
            rows[f"check x{len(names)}"] = median_ms(lambda: ck.check(), args.repeat)
        jobs = [(n, fastq.Spec4bit()) for n in large]
        rows[f"quantize {len(large)} x 32 MiB"] = median_ms(lambda: ck.quantize_all(jobs), max(3, args.repeat // 5))
        jobs_t = [(n, fastq.Spec4bit(), True) for n in large]
        rows["  transposed (mapping)"] = median_ms(lambda: ck.quantize_all(jobs_t), max(3, args.repeat // 5))
    print(f"fastq {fastq.__file__}")
    for k, v in rows.items():
        print(f"{k:28s} {v:9.3f} ms")


if __name__ == "__main__":
    main()
