"""FSDP loading strategies on the CPU (issue 9): 2 gloo processes load an NF4 model (double quant,
``bnb_4bit_quant_storage=bfloat16``) and wrap it in ``fully_shard`` (each decoder layer, then the root).

- ``share``: ``fastq.load`` with no device map under the process group: each rank reads and quantizes
  only the rows FSDP will give it (python/fastq/shard.py);
- ``full``: ``fastq.load(..., shard=False)``: every rank loads the whole model;
- ``scatter``: rank 0 loads the whole model (``shard=False``), then scatters each parameter's dim-0
  chunks (``torch.distributed.scatter``) and broadcasts the quant states; the other ranks build the
  skeleton (``fastq.loader.prepare``) and fill full-size anonymous tensors with their chunk, as the share
  mode does. A baseline only.

Per rank: bytes read from the checkpoint (the share's counter; the plan's bytes for a whole load), the
anonymous RSS (``RssAnon`` of /proc/self/status, over the RSS after imports) after the load and after
``fully_shard``, ``RssFile`` (checkpoint pages mapped in place: shared page cache), and the time
from the start of the load to a model every rank holds (barrier), then to the end of ``fully_shard``.
The checkpoint is a synthetic Llama (seeded, bf16) written once under ``$FASTQ_BENCH_DIR`` (default
target/bench-data/); the page cache is warm (one untimed read first).

Usage: python benches/bench_fsdp_share.py [--layers 16] [--strategies share full scatter]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


def bench_dir(layers: int) -> Path:
    base = os.environ.get("FASTQ_BENCH_DIR")
    return (Path(base) if base else ROOT / "target" / "bench-data") / f"llama-fsdp-{layers}l-bf16"


def make_checkpoint(layers: int) -> Path:
    """A seeded Llama (hidden 1024, intermediate 2816, 32k vocabulary, ``layers`` layers) in bf16."""
    folder = bench_dir(layers)
    if (folder / "config.json").exists():
        return folder
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def rss(kind: str = "RssAnon") -> int:
    """``RssAnon`` (or ``RssFile``: pages of mapped files, here the checkpoint's) of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_anon() -> int:
    return rss("RssAnon")


def _config():
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)


def _scatter_load(folder: str, rank: int):
    """Rank 0 loads the whole model and scatters each parameter's chunks; returns (model, bytes read)."""
    import torch.distributed as dist
    from fastq import loader
    from fastq.install import get_submodule, set_4bit, set_plain
    from fastq.shard import Share, _anonymous

    share = Share(rank, WORLD)
    if rank == 0:
        model = loader.load(folder, _config(), dtype=torch.bfloat16, progress=False, shard=False)
        read = sum(os.path.getsize(p) for p in Path(folder).glob("*.safetensors"))
    else:
        model, read = loader.prepare(folder, _config(), dtype=torch.bfloat16).model, 0
    names = [n for n, _ in model.named_parameters()]
    meta = [None]
    if rank == 0:
        params = dict(model.named_parameters())
        meta = [{n: (tuple(params[n].shape), params[n].dtype, getattr(params[n], "quant_state", None)) for n in names}]
    dist.broadcast_object_list(meta, src=0)
    params = dict(model.named_parameters())
    for n in names:
        shape, dtype, state = meta[0][n]
        rows = shape[0]
        c = -(-rows // WORLD)
        row_shape = (c, *shape[1:])
        recv = torch.empty(row_shape, dtype=dtype)
        chunks = None
        if rank == 0:
            full = params[n].detach()
            chunks = [torch.zeros(row_shape, dtype=dtype) for _ in range(WORLD)]
            for k in range(WORLD):
                r0, r1 = share.rows(rows, k)
                chunks[k][: r1 - r0].copy_(full[r0:r1])
        dist.scatter(recv, chunks, src=0)
        if rank == 0:
            continue
        r0, r1 = share.rows(rows)
        _, raw = _anonymous(torch.Size(shape).numel() * dtype.itemsize)
        t = raw.view(dtype).view(shape)
        t[r0:r1].copy_(recv[: r1 - r0])
        mod_name = n.rpartition(".")[0]
        if state is not None:
            set_4bit(get_submodule(model, mod_name), t, state, "cpu")
        else:
            set_plain(model, n, t, "cpu")
    return model, read


def worker(rank: int, folder: str, strategy: str, port: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import bitsandbytes  # noqa: F401  (imported before the baseline: their heaps are not the model's)
    import fastq
    import fastq.loader
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed.fsdp import fully_shard

    for p in Path(folder).glob("*.safetensors"):  # warm page cache, untimed
        p.read_bytes()
    gc.collect()
    base = rss_anon()
    dist.barrier()
    t0 = time.perf_counter()
    if strategy == "share":
        model = fastq.load(folder, _config(), dtype=torch.bfloat16, progress=False)
        read = model.fastq_share.read_bytes
    elif strategy == "full":
        model = fastq.load(folder, _config(), dtype=torch.bfloat16, progress=False, shard=False)
        read = sum(os.path.getsize(p) for p in Path(folder).glob("*.safetensors"))
    else:
        model, read = _scatter_load(folder, rank)
    dist.barrier()
    t_load = time.perf_counter() - t0
    gc.collect()
    rss_load, file_load = rss_anon() - base, rss("RssFile")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    gc.collect()
    dist.barrier()
    t_shard = time.perf_counter() - t0
    rss_shard, file_shard = rss_anon() - base, rss("RssFile")
    ids = torch.arange(16).repeat(1, 1) % 8 + 3
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    res = {"strategy": strategy, "rank": rank, "read_bytes": read, "rss_load": rss_load, "rss_sharded": rss_shard,
           "file_load": file_load, "file_sharded": file_shard,
           "t_load": t_load, "t_fully_shard": t_shard, "loss": loss}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--strategies", nargs="+", default=["share", "full", "scatter"])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch.multiprocessing as mp

        folder, strategy, out = args.worker
        mp.spawn(worker, args=(folder, strategy, _port(), out), nprocs=WORLD)
        return
    folder = make_checkpoint(args.layers)
    size = sum(os.path.getsize(p) for p in folder.glob("*.safetensors"))
    print(f"checkpoint {folder} ({size / 2**30:.2f} GiB bf16), {WORLD} gloo ranks, NF4 + double quant, "
          f"bf16 storage, {os.cpu_count()} CPUs")
    print(f"{'strategy':8} {'rank':>4} {'read MiB':>9} {'RSS load MiB':>12} {'RSS sharded MiB':>15} "
          f"{'RssFile load/sharded MiB':>24} {'load s':>7} {'+fully_shard s':>14} {'loss':>8}")
    for strategy in args.strategies:
        out = f"/tmp/bench_fsdp_share.{os.getpid()}.{strategy}"
        subprocess.run([sys.executable, __file__, "--worker", str(folder), strategy, out], check=True)
        for rank in range(WORLD):
            r = json.loads(Path(f"{out}.{rank}").read_text())
            print(f"{strategy:8} {rank:>4} {r['read_bytes'] / 2**20:9.0f} {r['rss_load'] / 2**20:12.0f} "
                  f"{r['rss_sharded'] / 2**20:15.0f} {r['file_load'] / 2**20:15.0f}/{r['file_sharded'] / 2**20:<8.0f} "
                  f"{r['t_load']:7.2f} {r['t_fully_shard']:14.2f} {r['loss']:8.4f}")


if __name__ == "__main__":
    main()
