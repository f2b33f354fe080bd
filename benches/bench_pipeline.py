"""Whole-checkpoint quantization from Python: time, GB/s and peak memory.

Quantizes every 2-D ``*proj.weight`` of the ~2.2 GB TinyLlama-shaped bf16 checkpoint that
``cargo bench --bench load`` writes (``target/bench-data/llama-1.1b-bf16``, or under
``$FASTQ_BENCH_DIR``) with ``fastq.open(path).quantize(...)``, dropping each result as it arrives (the
bounded-memory streaming pattern a loader uses), from a warm page cache. If the checkpoint is missing
it is written here with safetensors (same names, shapes and shards; other random values).

Each configuration runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own; the
report gives the peak and its increase over the RSS after imports (torch, bitsandbytes, fastq).

Usage: python benches/bench_pipeline.py [--repeat 3] [--spec nf4-dq|fp4-dq|int8] [--threads 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"

# TinyLlama-1.1B, as in benches/common/mod.rs.
HIDDEN, INTERMEDIATE, LAYERS, KV_DIM, VOCAB, SHARDS = 2048, 5632, 22, 256, 32000, 3


def bench_dir() -> Path:
    base = os.environ.get("FASTQ_BENCH_DIR")
    return (Path(base) if base else ROOT / "target" / "bench-data") / "llama-1.1b-bf16"


def llama_tensors() -> list[tuple[int, str, tuple[int, ...]]]:
    """(shard, name, shape) of every tensor in file order (the split of benches/common/mod.rs)."""
    from bench_convert import llama_tensors as named  # the one list of the bench model's tensors

    v = named(LAYERS)
    total = sum(_numel(s) for _, s in v)
    out, acc = [], 0
    for name, shape in v:
        out.append((min(acc * SHARDS // total, SHARDS - 1), name, shape))
        acc += _numel(shape)
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_name(i: int) -> str:
    return f"model-{i + 1:05}-of-{SHARDS:05}.safetensors"


def ensure_checkpoint(path: Path) -> None:
    """Writes the bench checkpoint unless a complete one is there (the index is written last)."""
    tensors = llama_tensors()
    sizes = [sum(_numel(s) * 2 for i, _, s in tensors if i == k) for k in range(SHARDS)]
    shards_ok = all(
        (path / shard_name(k)).is_file() and (path / shard_name(k)).stat().st_size > sizes[k]
        for k in range(SHARDS)
    )
    if (path / INDEX).is_file() and shards_ok:
        return
    import torch
    from safetensors.torch import save_file

    print(f"# writing the bench checkpoint to {path} (once)", file=sys.stderr)
    path.mkdir(parents=True, exist_ok=True)
    (path / INDEX).unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k in range(SHARDS):
        part = {}
        for i, name, shape in tensors:
            if i != k:
                continue
            if len(shape) == 1:
                part[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                part[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard_name(k)
        tmp = path / f"{shard_name(k)}.tmp"
        save_file(part, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / shard_name(k))
        del part
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2))


def warm_page_cache(path: Path) -> None:
    for f in sorted(path.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(8 << 20):
                pass


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(path: Path, threads: int | None, spec_name: str) -> dict:
    """One run in this (fresh) process; returns the measurements."""
    import bitsandbytes.functional  # noqa: F401  (imported by fastq on the first result; count it in the baseline)
    import fastq
    import torch  # noqa: F401

    spec = (
        fastq.SPEC_INT8
        if spec_name == "int8"
        else fastq.Spec4bit(spec_name.split("-")[0], 64, spec_name.endswith("-dq"))
    )
    base_rss = _rss_kb()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ckpt = fastq.open(path)
    t_open = time.perf_counter() - t0
    jobs = [
        (m.name, spec)
        for m in map(ckpt.meta, ckpt.keys())
        if len(m.shape) == 2 and m.name.endswith("proj.weight")
    ]
    in_bytes = sum(ckpt.meta(n).nbytes for n, _ in jobs)
    out_bytes = 0
    for _name, (a, b) in ckpt.quantize(jobs, threads=threads):
        out_bytes += a.numel() * a.element_size()
        del a, b, _name
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "threads": fastq.ops.thread_count(threads),
        "kernel": fastq.ops.kernel_name(),
        "tensors": len(jobs),
        "in_bytes": in_bytes,
        "out_bytes": out_bytes,
        "seconds": seconds,
        "open_seconds": t_open,
        "base_rss_kb": base_rss,
        "base_peak_kb": base_peak,
        "peak_kb": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument("--spec", default="nf4-dq", choices=["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"])
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0 means every core")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = bench_dir()

    if args.child:
        threads = args.threads[0] or None
        print(json.dumps(child(path, threads, args.spec)))
        return

    ensure_checkpoint(path)
    warm_page_cache(path)
    load = os.getloadavg()
    print(f"# {path}, spec {args.spec}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = (
        "| threads | runs | median s | best s | GB/s (median) | peak RSS MB (max) | "
        "RSS after imports MB | peak increase MB (max) |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for threads in args.threads:
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--child", "--spec", args.spec, "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        secs = [r["seconds"] for r in runs]
        med = statistics.median(secs)
        gb = runs[0]["in_bytes"] / 1e9
        peak = max(r["peak_kb"] for r in runs) / 1024
        base = statistics.median(r["base_rss_kb"] for r in runs) / 1024
        inc = max(r["peak_kb"] - r["base_rss_kb"] for r in runs) / 1024
        print(
            f"| {runs[0]['threads']:>7} | {len(runs):>4} | {med:>8.3f} | {min(secs):>6.3f} | {gb / med:>13.2f} "
            f"| {peak:>17.0f} | {base:>20.0f} | {inc:>22.0f} |"
        )
    r = runs[0]
    print(
        f"# {r['tensors']} tensors, {r['in_bytes'] / 1e9:.3f} GB bf16 in, {r['out_bytes'] / 1e9:.3f} GB packed out, "
        f"kernel {r['kernel']}, open {r['open_seconds'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
