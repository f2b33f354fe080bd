"""``fastq.convert`` against transformers + bitsandbytes on the CPU, side by side in one run.

1. A 1.1B-parameter bf16 Llama (TinyLlama's shape, 2.2 GB in 3 shards) converted to NF4: fastq
   (``fastq.convert``) and transformers (``from_pretrained(..., quantization_config, device_map="cpu")``
   then ``save_pretrained``), each in a fresh subprocess from a warm page cache, with wall time and peak
   RSS (``ru_maxrss``). The two outputs are compared file by file.
2. fastq's peak RSS when the checkpoint doubles (the same shapes with 44 layers, 4.4 GB).
3. Reading the converted NF4 checkpoint back with ``fastq.load`` against the page-cache read bandwidth of
   the same files (``os.readv`` into a 16 MiB buffer), measured in the same subprocess.

The shards of ``target/bench-data/llama-1.1b-bf16`` (written by ``cargo bench --bench load`` or
benches/bench_pipeline.py) are reused through symlinks when they are there; otherwise, and for the 2x
checkpoint, this script writes its own (random weights, one tensor in memory at a time) under
``target/bench-data/convert`` (or ``$FASTQ_BENCH_DIR/convert``).

Usage: python benches/bench_convert.py [--repeat 3] [--skip-transformers] [--append BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = (Path(os.environ["FASTQ_BENCH_DIR"]) if os.environ.get("FASTQ_BENCH_DIR") else ROOT / "target" / "bench-data")
SHARED = BASE / "llama-1.1b-bf16"
WORK = BASE / "convert"
HIDDEN, INTERMEDIATE, KV_DIM, VOCAB = 2048, 5632, 256, 32000
INDEX = "model.safetensors.index.json"
CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


# -- checkpoints -------------------------------------------------------------------------------------


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
    }


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    v = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        v += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (KV_DIM, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (KV_DIM, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    return v + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A safetensors file of bf16 tensors, generated and written one at a time."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, shape in tensors:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            f.write(t.to(torch.bfloat16).view(torch.uint16).numpy().tobytes())
    tmp.replace(path)


def ensure_checkpoint(folder: Path, layers: int, shards: int) -> Path:
    """config.json + ``shards`` shards + index; for 22 layers, the shared bench shards when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    if (folder / INDEX).exists():
        return folder
    names = [f"model-{k + 1:05}-of-{shards:05}.safetensors" for k in range(shards)]
    if layers == 22 and (SHARED / INDEX).is_file() and all((SHARED / n).is_file() for n in names):
        for n in [*names, INDEX]:
            (folder / n).unlink(missing_ok=True)
            (folder / n).symlink_to(SHARED / n)
        return folder
    print(f"# writing {folder} (once)", file=sys.stderr)
    # in a child process, so that this one stays small: a child's ru_maxrss starts from its parent's RSS
    subprocess.run([sys.executable, __file__, "--child", "make", str(folder), str(layers), str(shards)], check=True)
    return folder


def child_make(folder: str, layers: str, shards: str) -> dict:
    folder, layers, shards = Path(folder), int(layers), int(shards)
    tensors = llama_tensors(layers)
    names = [f"model-{k + 1:05}-of-{shards:05}.safetensors" for k in range(shards)]
    total = sum(_numel(s) for _, s in tensors)
    parts: list[list] = [[] for _ in range(shards)]
    acc = 0
    for name, shape in tensors:
        parts[min(acc * shards // total, shards - 1)].append((name, shape))
        acc += _numel(shape)
    for k, part in enumerate(parts):
        _write_shard(folder / names[k], part, seed=1000 + k)
    weight_map = {name: names[k] for k, part in enumerate(parts) for name, _ in part}
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return {}


def warm(folder: Path) -> int:
    """Reads every file once (page cache warm); returns the bytes read."""
    n, buf = 0, bytearray(16 << 20)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                while k := os.readv(fd, [buf]):
                    n += k
            finally:
                os.close(fd)
    return n


# -- children (one measurement per fresh process) ----------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    """ru_maxrss. (Linux carries the parent's RSS at fork into a child's ru_maxrss, so the parent of these
    children stays small; VmHWM, reported beside it, is the child's own.)"""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_fastq(src: str, dst: str, cfg: str) -> dict:
    t0 = time.perf_counter()
    import fastq
    from fastq.loader import prepare

    t_import = time.perf_counter() - t0
    rss_import = _rss_mb()
    qcfg = fastq.QuantConfig(**CONFIGS[cfg])
    t1 = time.perf_counter()
    prepare(src, qcfg)  # transformers' lazy imports of the model code (paid once per process)
    t_lazy = time.perf_counter() - t1
    rss_ready = _rss_mb()
    t2 = time.perf_counter()
    fastq.convert(src, dst, qcfg, progress=False)
    t_convert = time.perf_counter() - t2
    return {"import_s": t_import, "lazy_import_s": t_lazy, "convert_s": t_convert, "rss_import_mb": rss_import,
            "rss_ready_mb": rss_ready, "peak_mb": _peak_mb(), "hwm_mb": _hwm_mb()}


def child_transformers(src: str, dst: str, cfg: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    t_import = time.perf_counter() - t0
    rss_import = _rss_mb()
    t1 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(**CONFIGS[cfg]), device_map="cpu", dtype=torch.bfloat16
    )
    t_load = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.save_pretrained(dst)
    t_save = time.perf_counter() - t2
    return {"import_s": t_import, "load_s": t_load, "save_s": t_save, "convert_s": t_load + t_save,
            "rss_import_mb": rss_import, "peak_mb": _peak_mb(), "hwm_mb": _hwm_mb()}


def child_load(folder: str) -> dict:
    """Page-cache read bandwidth of the checkpoint's shards, then ``fastq.load`` of it (after a first load
    that pays transformers' lazy imports), then the same with every page of every tensor touched."""
    import fastq
    import torch
    from fastq.loader import prepare

    files = sorted(Path(folder).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    fastq.load(folder, None, "cpu", progress=False)  # lazy imports, skeleton code paths
    buf = bytearray(16 << 20)
    reads, loads, touched, plans = [], [], [], []
    for _ in range(3):
        t = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                while os.readv(fd, [buf]):
                    pass
            finally:
                os.close(fd)
        reads.append(time.perf_counter() - t)
    for _ in range(3):  # the part of a load that reads nothing: empty model, module swap, plan
        t = time.perf_counter()
        prepare(folder)
        plans.append(time.perf_counter() - t)
    for _ in range(3):
        t = time.perf_counter()
        model = fastq.load(folder, None, "cpu", progress=False)
        loads.append(time.perf_counter() - t)
        seen = set()
        for v in model.state_dict().values():  # one byte per 4 KiB page: the bytes are really read
            b = v.detach().reshape(-1).view(torch.uint8)
            if b.numel() and (b.data_ptr(), b.numel()) not in seen:
                seen.add((b.data_ptr(), b.numel()))
                int(b[::4096].sum())
        touched.append(time.perf_counter() - t)
        del model
    return {"bytes": size, "read_s": min(reads), "load_s": min(loads), "load_touch_s": min(touched),
            "prepare_s": min(plans)}


def run_child(kind: str, *args: str) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], check=True, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t
    return r


# -- the run --------------------------------------------------------------------------------------------


def same_files(a: Path, b: Path) -> str:
    names = sorted(p.name for p in a.iterdir())
    other = sorted(p.name for p in b.iterdir() if p.name != "fastq-manifest.json")
    if names != other:
        return f"different files: {sorted(set(names) ^ set(other))}"
    diff = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    return "identical, byte for byte" if not diff else f"differ: {', '.join(diff)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="fresh fastq processes per configuration")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--append", metavar="FILE", help="append the report to this markdown file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"fastq": child_fastq, "transformers": child_transformers, "load": child_load, "make": child_make}[kind]
        print(json.dumps(fn(*rest)))
        return

    small = ensure_checkpoint(WORK / "llama-1.1b", 22, 3)
    big = ensure_checkpoint(WORK / "llama-2.2b", 44, 6)
    out = WORK / "out"
    out.mkdir(exist_ok=True)
    lines = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    load = os.getloadavg()
    emit(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
         f"Python {platform.python_version()}; load average at start {load[0]:.2f}")
    emit(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; command: `python benches/bench_convert.py"
         f" --repeat {args.repeat}{' --skip-transformers' if args.skip_transformers else ''}`")
    emit()
    emit("| run | process s | imports s | convert() s | peak RSS MB (ru_maxrss) | VmHWM MB | RSS after imports MB |")
    emit("|---|---|---|---|---|---|---|")
    results = {}
    for name, src, cfg in [("fastq 1.1B nf4", small, "nf4"), ("fastq 1.1B nf4 + double quant", small, "nf4-dq"),
                           ("fastq 1.1B int8", small, "int8"), ("fastq 2.2B nf4 (2x)", big, "nf4")]:
        runs = []
        for _ in range(args.repeat):
            warm(src)
            dst = out / f"fastq-{src.name}-{cfg}"
            shutil.rmtree(dst, ignore_errors=True)
            runs.append(run_child("fastq", str(src), str(dst), cfg))
        best = min(runs, key=lambda r: r["convert_s"])
        med = statistics.median(r["convert_s"] for r in runs)
        results[name] = {"best": best, "median": med, "peak": max(r["peak_mb"] for r in runs), "runs": runs}
        emit(f"| {name} | {statistics.median(r['process_s'] for r in runs):.1f} | "
             f"{best['import_s'] + best['lazy_import_s']:.1f} | {med:.2f} (best {best['convert_s']:.2f}) | "
             f"{results[name]['peak']:.0f} | {max(r['hwm_mb'] for r in runs):.0f} | {best['rss_ready_mb']:.0f} |")
    if not args.skip_transformers:
        for cfg in ("nf4",):
            warm(small)
            dst = out / f"transformers-{cfg}"
            shutil.rmtree(dst, ignore_errors=True)
            r = run_child("transformers", str(small), str(dst), cfg)
            results[f"transformers {cfg}"] = r
            emit(f"| transformers + bitsandbytes 1.1B {cfg} (from_pretrained {r['load_s']:.1f} s + save_pretrained "
                 f"{r['save_s']:.1f} s) | {r['process_s']:.1f} | {r['import_s']:.1f} | {r['convert_s']:.2f} | "
                 f"{r['peak_mb']:.0f} | {r['hwm_mb']:.0f} | {r['rss_import_mb']:.0f} |")
            emit()
            emit(f"fastq's and transformers' {cfg} folders: {same_files(dst, out / f'fastq-{small.name}-{cfg}')}.")
    emit()
    ratios = []
    for folder in (out / f"fastq-{small.name}-nf4", out / f"fastq-{big.name}-nf4"):
        warm(folder)
        r = run_child("load", str(folder))
        gbs = r["bytes"] / 1e9
        page, load_bw, touch_bw = gbs / r["read_s"], gbs / r["load_s"], gbs / r["load_touch_s"]
        ratios.append((folder.name, load_bw / page, touch_bw / page))
        emit(f"Reading {folder.name} ({gbs:.2f} GB) in one process, best of 3: page cache (os.readv into 16 MiB) "
             f"{page:.1f} GB/s; fastq.load {r['load_s']:.3f} s = {load_bw:.1f} GB/s ({load_bw / page:.0%}); "
             f"fastq.load + touching every page {r['load_touch_s']:.3f} s = {touch_bw:.1f} GB/s ({touch_bw / page:.0%}); "
             f"of the load, {r['prepare_s']:.3f} s build the empty model and plan before a byte is read "
             f"(the rest: {gbs / max(r['load_s'] - r['prepare_s'], 1e-9):.1f} GB/s).")
    small_peak, big_peak = results["fastq 1.1B nf4"]["peak"], results["fastq 2.2B nf4 (2x)"]["peak"]
    conv = results["fastq 1.1B nf4"]["median"]
    emit()
    emit("Targets:")
    emit(f"- fastq <= 2 s warm: convert() {conv:.2f} s (median) - "
         f"{'met' if conv <= 2 else 'NOT met'} for the conversion; the whole process takes "
         f"{statistics.median(r['process_s'] for r in results['fastq 1.1B nf4']['runs']):.1f} s, most of it importing "
         "torch/transformers/bitsandbytes and transformers' model code (transformers pays the same).")
    emit(f"- peak < 1 GB: {small_peak:.0f} MB - {'met' if small_peak < 1024 else 'NOT met'} "
         "(of which the Python/torch/transformers floor is the 'RSS after imports').")
    emit(f"- flat when doubling: {small_peak:.0f} MB -> {big_peak:.0f} MB ({big_peak - small_peak:+.0f} MB) - "
         f"{'met' if big_peak - small_peak < 0.1 * small_peak else 'NOT met'}.")
    for name, lr, tr in ratios:
        emit(f"- load >= 70% of page-cache bandwidth ({name}): fastq.load {lr:.0%}, with every page touched {tr:.0%} "
             f"- {'met' if min(lr, tr) >= 0.7 else 'NOT met'}.")
    if args.append:
        path = Path(args.append)
        text = path.read_text() if path.exists() else ""
        with open(path, "a") as f:
            f.write(("\n" if text and not text.endswith("\n\n") else "") + "## Convert (issue 4)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
