"""Early reads beside the skeleton's build, on the CPU: how much they slow the build and how soon they
end (early_reads.py; BENCHMARKS.md run 15).

    python3 benches/bench_early_reads.py [--work /tmp/fastq-early] [--layers 32] [--threads 1] [--repeat 7]

Writes a checkpoint with the names and sizes of a Llama-2-7B NF4 + double-quant conversion (random bytes;
``--layers`` decoder layers: 32 is 3.9 GB, ~1,600 tensors), warms the page cache, then builds the real
7B skeleton (``skeleton.build_empty`` + ``replace_modules``, NF4) in this thread: alone, and while
``EarlyReads`` (``_fastq.Upload``, no GIL) streams the checkpoint to a CPU "device". Prints the
skeleton's seconds and when the reads ended, the median of ``--repeat`` runs. The skeleton's figure is
the point; the reads' end is not a GPU's: on the CPU "device" every copy is a memcpy into fresh pages
(on one thread, page faults and all), where on a GPU the DMA engine copies. (Run 15 also timed the
Python loop that streamed them before; it was removed once the GPU had timed both.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
          "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": VOCAB,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}


def make_checkpoint(folder: Path, layers: int) -> None:
    """A pre-quantized-shaped checkpoint: the names, dtypes, sizes and quant_state JSONs of bitsandbytes'
    NF4 + DQ state dict, random codes (fastq's plan accepts it; ``--work``'s config.json describes it)."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return
    cfg = dict(CONFIG, num_hidden_layers=layers, quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"})
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def u8(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)

    tensors = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16),
               "lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for name, (o, n) in LINEARS.items():
            w = p + name + ".weight"
            blocks = o * n // 64
            tensors[w] = u8(o * n // 2).reshape(-1, 1)
            tensors[w + ".absmax"] = u8(blocks)
            tensors[w + ".quant_map"] = torch.randn(16, generator=g)
            tensors[w + ".nested_absmax"] = torch.rand(-(-blocks // 256), generator=g)
            tensors[w + ".nested_quant_map"] = torch.randn(256, generator=g)
            qs = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [o, n], "nested_blocksize": 256,
                  "nested_dtype": "float32", "nested_offset": 0.0123}
            tensors[w + ".quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(json.dumps(qs).encode()),
                                                                              dtype=torch.uint8)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))


def skeleton_seconds(config_dir: Path) -> float:
    from fastq.config import QuantConfig
    from fastq.skeleton import build_empty, replace_modules

    cfg = QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    t = time.perf_counter()
    model = build_empty(config_dir, torch.bfloat16, False)
    replace_modules(model, cfg, None, torch.bfloat16)
    return time.perf_counter() - t


def one(ckpt, config_dir: Path, engine: str | None, threads: int) -> dict:
    from fastq.early_reads import EarlyReads, early_names

    t0 = time.perf_counter()
    early = None
    if engine is not None:
        early = EarlyReads(ckpt, torch.device("cpu"), early_names(ckpt, torch.bfloat16, prequantized=True), threads)
    skel = skeleton_seconds(config_dir)
    out = {"engine": engine or "none", "skeleton_s": skel}
    if early is not None:
        kept = list(early.arrivals())  # held, as a load's parameters hold them
        out |= {"reads_end_s": time.perf_counter() - t0, "tensors": len(kept)}
        early.cancel()
        del kept
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastq-early"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="reader threads (the skeleton needs a core of its own)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    import fastq

    folder = args.work / f"pre-{args.layers}"
    make_checkpoint(folder, args.layers)
    (args.work / "config.json").write_text(json.dumps(CONFIG))
    path = folder / "model.safetensors"
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    ckpt = fastq.open(path)
    print(f"checkpoint: {path.stat().st_size / 1e9:.2f} GB, {len(ckpt.keys())} tensors; reader threads {args.threads}",
          file=sys.stderr)
    skeleton_seconds(args.work)  # imports and first-build costs out of the figures
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for engine in (None, "rust"):
            r = one(ckpt, args.work, engine, args.threads)
            runs.setdefault(r["engine"], []).append(r)
    print("| engine | skeleton (s), median | reads end (s), median | runs |\n| --- | ---: | ---: | ---: |")
    for engine, rs in runs.items():
        print(json.dumps({"engine": engine, "runs": rs}), file=sys.stderr)
        skel = statistics.median(r["skeleton_s"] for r in rs)
        end = f"{statistics.median(r['reads_end_s'] for r in rs):.3f}" if "reads_end_s" in rs[0] else "-"
        print(f"| {engine} | {skel:.3f} | {end} | {len(rs)} |")


if __name__ == "__main__":
    main()
