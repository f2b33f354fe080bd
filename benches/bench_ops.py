"""fastq.ops against bitsandbytes on one 4096 x 11008 bf16 weight (Llama-7B's MLP shape).

Times ``fastq.ops.quantize_4bit`` against ``bitsandbytes.functional.quantize_4bit`` (nf4 and fp4,
blocksize 64, double quantization on) and ``fastq.ops.quantize_int8`` against bitsandbytes'
``Int8Params._quantize("cpu")``, on one thread and on every core (bitsandbytes runs on torch's threads,
set with ``torch.set_num_threads``). bitsandbytes' CPU path is slow, so it runs once; fastq reports
the median of ``--reps`` runs. The packed codes of both are compared as a sanity check.

Usage: python benches/bench_ops.py [--reps 7] [--rows 4096 --cols 11008]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import fastq
import torch


def _timed(fn, reps: int):
    """(median seconds, last result) of ``reps`` calls."""
    times, out = [], None
    for _ in range(reps):
        out = None  # free the previous result before the next run
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _bnb_4bit(w: torch.Tensor, quant_type: str):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)


def _bnb_int8(w: torch.Tensor):
    from bitsandbytes.nn import Int8Params

    p = Int8Params(w, requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    return p.CB, p.SCB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="fastq repetitions (median reported)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    args = ap.parse_args()

    import bitsandbytes

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16)
    n = w.numel()
    all_threads = fastq.ops.thread_count()
    print(
        f"# {args.rows}x{args.cols} bf16 ({n / 1e6:.1f} M elements), fastq kernel {fastq.ops.kernel_name()}, "
        f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}, cores {os.cpu_count()}"
    )
    print(f"# load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    header = f"| {'op':<14} | threads | {'fastq Melem/s':>13} | {'bnb Melem/s':>11} | {'fastq/bnb':>9} | same codes |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")

    cases = []
    for qt in ("nf4", "fp4"):
        cases.append(
            (
                f"{qt}+dq",
                lambda t, qt=qt: fastq.ops.quantize_4bit(w, 64, qt, True, threads=t),
                lambda qt=qt: _bnb_4bit(w, qt),
                lambda a, b: torch.equal(a[0], b[0]),
            )
        )
    cases.append(
        (
            "int8",
            lambda t: fastq.ops.quantize_int8(w, threads=t),
            lambda: _bnb_int8(w),
            lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]),
        )
    )
    old_threads = torch.get_num_threads()
    for name, ours, theirs, same in cases:
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            ours(threads)  # warm up: page in the input, start the worker pool
            t_ours, r_ours = _timed(lambda ours=ours, threads=threads: ours(threads), args.reps)
            t_bnb, r_bnb = _timed(theirs, 1)
            eq = same(r_ours, r_bnb)
            del r_ours, r_bnb
            print(
                f"| {name:<14} | {threads:>7} | {n / t_ours / 1e6:>13.0f} | {n / t_bnb / 1e6:>11.1f} "
                f"| {t_bnb / t_ours:>8.0f}x | {'yes' if eq else 'NO':<10} |"
            )
    torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
