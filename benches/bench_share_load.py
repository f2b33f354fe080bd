"""The FSDP share mode's load against a whole load, in one process (issue 9): a gloo group of world 1,
then ``fastq.load(folder, cfg, dtype=torch.bfloat16, shard=True)`` (shard.py: range jobs through the Rust pipeline) against
``shard=False`` (``Checkpoint.quantize`` over whole tensors), each timed ``--repeats`` times on the
checkpoint of bench_fsdp_share.py (NF4 + double quant, ``bnb_4bit_quant_storage=bfloat16``; page cache
warm: one untimed load first).

Usage: python benches/bench_share_load.py [--layers 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fsdp_share import _config, make_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import fastq

    folder = str(make_checkpoint(args.layers))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = _config()
    fastq.load(folder, cfg, dtype=torch.bfloat16, shard=False, progress=False)  # warms the page cache
    for shard in (True, False):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model = fastq.load(folder, cfg, dtype=torch.bfloat16, shard=shard, progress=False)
            times.append(time.perf_counter() - t0)
            del model
        print(f"shard={shard}: " + " ".join(f"{t:.3f}" for t in times) + " s")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
