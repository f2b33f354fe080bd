"""fastq vs transformers + bitsandbytes on a GPU, side by side in one run (run on the GPU machine).

    python3 benches/gpu/compare.py --work /tmp/fastq-gpu --out $OUT [--layers 32] [--cases ...]

Makes a Llama-2-7B-shaped bf16 checkpoint (random weights, 3 shards) unless present, warms the page
cache, then runs each case in a fresh subprocess (imports excluded from the timing):
  tf_nf4 / fq_nf4    from_pretrained vs fastq.load, NF4 + double quant, bf16 compute, device_map={"": 0}
  tf_int8 / fq_int8  the same in LLM.int8
  fq_convert         fastq.convert of the checkpoint to NF4 (CPU only, all cores)
  tf_pre / fq_pre    reloading that pre-quantized checkpoint with transformers and with fastq
  fq_nf4_cpu / fq_int8_cpu   fastq.load quantizing on the CPU (quantize_on="cpu"), then copying
  fq_convert8, tf_pre8 / fq_pre8   the same for an int8 conversion
  tf_plain / fq_plain / st_plain   the bf16 checkpoint with no quantization (st: safetensors' load_file
                     of each shard to the GPU, the plain reader)
  cold_tf_nf4 / cold_fq_nf4        NF4 + double quant with the checkpoint dropped from the page cache
fastq cases also report the phases of the load (resolve, skeleton, plan, fill, finalize) and the ring's
timeline (read / copy / device busy time and GB/s, first start and last end of each).
Each case reports load seconds, GPU peak (allocated, reserved, after), host memory (peak RSS; peaks of
anonymous, file-backed and shared memory; pinned memory: torch's host allocator, fastq's ring), a greedy-generation
speed with bitsandbytes' kernels, and the last-position logits of a fixed prompt (compared across cases at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LLAMA7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def make_checkpoint(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA7B, num_hidden_layers=layers)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{k}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    names = list(shapes)
    g = torch.Generator(device="cuda").manual_seed(0)
    per = -(-len(names) // 3)
    weight_map, total = {}, 0
    for s in range(3):
        fname = f"model-{s + 1:05d}-of-00003.safetensors"
        chunk = {}
        for n in names[s * per:(s + 1) * per]:
            shp = shapes[n]
            t = torch.ones(shp, device="cuda") if len(shp) == 1 else torch.randn(shp, device="cuda", generator=g) * 0.02
            chunk[n] = t.to(torch.bfloat16).cpu()
            weight_map[n] = fname
            total += chunk[n].numel() * 2
        save_file(chunk, path / fname, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(cfg))


def warm(path: Path) -> float:
    """Reads every shard once (page cache warm); returns the single-thread read bandwidth."""
    total = 0
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / (time.perf_counter() - t) / 1e9


def run_case(case: str, ckpt: Path, pre: Path, pre8: Path, out: Path) -> dict:
    # Imports excluded from every timing: both loaders lazily import these on first use.
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import fastq
    import fastq.loader  # fastq imports its stages on first use
    import torch
    import transformers
    import transformers.integrations.bitsandbytes
    import transformers.models.llama.modeling_llama
    import transformers.quantizers.auto
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer  # noqa: F401
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer  # noqa: F401

    bnb4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    bnb8 = transformers.BitsAndBytesConfig(load_in_8bit=True)
    dm = {"": 0}
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    base_rss = _rss_now()
    sampler = HostSampler()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    kind = case.removeprefix("cold_")  # a cold case is its warm twin run after drop_cache (main)
    if kind == "tf_nf4":
        m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb4, device_map=dm, dtype=torch.bfloat16)
    elif kind == "fq_nf4":
        m = fastq.load(ckpt, bnb4, dm, dtype=torch.bfloat16, progress=False)
    elif kind == "tf_int8":
        m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb8, device_map=dm, dtype=torch.bfloat16)
    elif kind == "fq_int8":
        m = fastq.load(ckpt, bnb8, dm, dtype=torch.bfloat16, progress=False)
    elif kind == "fq_convert":
        fastq.convert(ckpt, pre, bnb4, progress=False, overwrite=True)
        return {"case": case, "load_s": time.perf_counter() - t, "rss_gb": _rss()}
    elif kind == "fq_nf4_cpu":
        m = fastq.load(ckpt, bnb4, dm, dtype=torch.bfloat16, progress=False, quantize_on="cpu")
    elif kind == "fq_int8_cpu":
        m = fastq.load(ckpt, bnb8, dm, dtype=torch.bfloat16, progress=False, quantize_on="cpu")
    elif kind == "fq_convert8":
        fastq.convert(ckpt, pre8, bnb8, progress=False, overwrite=True)
        return {"case": case, "load_s": time.perf_counter() - t, "rss_gb": _rss()}
    elif kind == "tf_pre8":
        m = transformers.AutoModelForCausalLM.from_pretrained(pre8, device_map=dm, dtype=torch.bfloat16)
    elif kind == "fq_pre8":
        m = fastq.load(pre8, None, dm, dtype=torch.bfloat16, progress=False)
    elif kind == "tf_plain":
        m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, device_map=dm, dtype=torch.bfloat16)
    elif kind == "fq_plain":
        m = fastq.load(ckpt, None, dm, dtype=torch.bfloat16, progress=False)
    elif kind == "st_plain":
        from safetensors.torch import load_file

        n = sum(v.numel() for f in sorted(ckpt.glob("*.safetensors")) for v in load_file(f, device="cuda:0").values())
        torch.cuda.synchronize()
        return {"case": case, "load_s": time.perf_counter() - t, "rss_gb": _rss(), "elements": n}
    elif kind == "tf_pre":
        m = transformers.AutoModelForCausalLM.from_pretrained(pre, device_map=dm, dtype=torch.bfloat16)
    elif kind == "fq_pre":
        m = fastq.load(pre, None, dm, dtype=torch.bfloat16, progress=False)
    else:
        raise SystemExit(f"unknown case {case}")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    host = sampler.stop()
    gpu_peak = torch.cuda.max_memory_allocated() / 1e9
    gpu_reserved = torch.cuda.max_memory_reserved() / 1e9
    gpu_after = torch.cuda.memory_allocated() / 1e9
    extra = {"anon_peak_gb": host["anon"], "file_peak_gb": host["file"], "shmem_peak_gb": host["shmem"],
             "pinned_torch_gb": pinned_torch_gb(), "gpu_reserved_peak_gb": gpu_reserved, "gpu_allocated_after_gb": gpu_after}
    if case.startswith(("fq", "cold_fq")):  # fastq's ring (registered by default: not in torch's allocator)
        extra["ring_gb"] = fastq.transfer.SLOTS * fastq.transfer.SLOT_BYTES / 1e9
    tl = fastq.transfer.LAST_TIMELINE.timeline if case.startswith(("fq", "cold_fq")) else None
    if tl is not None:
        extra["phases"] = tl.phases()
        extra["ring"] = tl.summary()
        extra["spans"] = tl.spans()
    if os.environ.get("COMPARE_LOAD_ONLY"):  # probe.py: the load's figures only
        extra.pop("spans", None)
        return {**extra, "case": case, "load_s": load_s, "gpu_peak_gb": gpu_peak, "rss_gb": _rss()}
    ids = torch.arange(1, 65, device="cuda").unsqueeze(0) * 37 % 32000
    with torch.no_grad():
        logits = m(ids).logits[0, -1].float().cpu()
        m.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen = m.generate(ids[:, :8], max_new_tokens=64, min_new_tokens=64, do_sample=False)
        torch.cuda.synchronize()
        tok_s = 64 / (time.perf_counter() - t)
    torch.save(logits, out / f"logits_{case}.pt")
    digests = {}
    for name, mod in m.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or not hasattr(w, "quant_state") and not hasattr(w, "SCB"):
            continue
        d = {"weight": _sha(w.data)}
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            d.update(absmax=_sha(qs.absmax), offset=float(qs.offset) if qs.offset is not None else None,
                     nested_absmax=_sha(qs.state2.absmax) if qs.state2 is not None else None)
        if getattr(w, "SCB", None) is not None:
            d["SCB"] = _sha(w.SCB)
        digests[name] = d
    (out / f"digests_{case}.json").write_text(json.dumps(digests))
    spans = extra.pop("spans", None)
    if spans is not None:
        (out / f"timeline_{case}.json").write_text(json.dumps(spans))
    return {**extra, "case": case, "load_s": load_s, "gpu_peak_gb": gpu_peak, "rss_gb": _rss(), "rss_base_gb": base_rss,
            "tok_s": tok_s, "tokens": gen[0, 8:24].tolist(), "footprint_gb": m.get_memory_footprint() / 1e9}


def _f32_bits(x: float) -> int:
    import struct

    return struct.unpack("<i", struct.pack("<f", x))[0]


def _sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.detach().contiguous().cpu().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()[:16]


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


class HostSampler:
    """Peak resident memory of this process by kind - anonymous (RssAnon), file-backed (RssFile: the
    mapped checkpoint), shared (RssShmem) - sampled every 5 ms from /proc/self/status, in GB."""

    KINDS = (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem"))

    def __init__(self):
        import threading

        self.peak = {kind: 0 for _, kind in self.KINDS}
        self.done = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _read(self) -> dict[str, int]:
        fields, out = dict(self.KINDS), {}
        with open("/proc/self/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in fields:
                    out[fields[parts[0]]] = int(parts[1]) * 1024
        return out

    def _sample(self) -> None:
        for k, v in self._read().items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self):
        while not self.done:
            self._sample()
            time.sleep(0.005)

    def stop(self) -> dict[str, float]:
        self.done = True
        self.t.join()
        self._sample()
        return {k: v / 1e9 for k, v in self.peak.items()}


def pinned_torch_gb() -> float:
    """Pinned host memory torch's caching host allocator holds now (``pin_memory``, ``cudaHostAlloc``)."""
    import torch

    try:
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 1e9
    except (AttributeError, RuntimeError):  # older torch, or no CUDA
        return 0.0


def drop_cache(path: Path) -> None:
    """Drops the folder's files from the page cache (fadvise; and drop_caches where allowed)."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


PAIRS = (("tf_nf4", "fq_nf4"), ("tf_nf4", "fq_nf4_cpu"), ("tf_int8", "fq_int8"), ("tf_int8", "fq_int8_cpu"),
         ("tf_pre", "fq_pre"), ("tf_nf4", "fq_pre"), ("tf_pre8", "fq_pre8"), ("tf_plain", "fq_plain"),
         ("cold_tf_nf4", "cold_fq_nf4"))


def compare_pair(a: str, b: str, by: dict, out: Path) -> None:
    """Loads, logits, greedy tokens and per-module digests of two cases (printed as soon as both ran, so a
    call cut by its time limit keeps the comparisons it reached)."""
    import torch

    la, lb = torch.load(out / f"logits_{a}.pt"), torch.load(out / f"logits_{b}.pt")
    print(f"{a} vs {b}: load {by[a]['load_s']:.2f}s vs {by[b]['load_s']:.2f}s "
          f"({by[a]['load_s'] / by[b]['load_s']:.1f}x), logits max|diff| {(la - lb).abs().max():.4g} "
          f"(scale {la.abs().max():.3g}), same tokens {by[a]['tokens'] == by[b]['tokens']}")
    da = json.loads((out / f"digests_{a}.json").read_text())
    db = json.loads((out / f"digests_{b}.json").read_text())
    for field in ("weight", "absmax", "offset", "nested_absmax", "SCB"):
        same = sum(1 for k in da if field in da[k] and da[k][field] == db.get(k, {}).get(field))
        total = sum(1 for k in da if field in da[k])
        if total:
            print(f"  {field}: {same}/{total} modules byte-identical")
    pairs = [(da[k]["offset"], db[k]["offset"]) for k in da
             if da[k].get("offset") is not None and db.get(k, {}).get("offset") is not None]
    if pairs:
        ulps = [abs(_f32_bits(x) - _f32_bits(y)) for x, y in pairs]
        rel = max(abs(x - y) / abs(x) for x, y in pairs if x)
        print(f"  offset: max {max(ulps)} float32 ulp apart (max relative {rel:.2g}); "
              f"{sum(u == 1 for u in ulps)} modules 1 ulp, {sum(u > 1 for u in ulps)} more")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fastq-gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cases", nargs="*", default=[
        "st_plain", "tf_plain", "fq_plain", "tf_nf4", "fq_nf4", "fq_nf4_cpu", "tf_int8", "fq_int8", "fq_int8_cpu",
        "fq_convert", "tf_pre", "fq_pre", "fq_convert8", "tf_pre8", "fq_pre8", "cold_tf_nf4", "cold_fq_nf4"])
    ap.add_argument("--case")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, pre, pre8 = work / "llama7b", work / "llama7b-nf4", work / "llama7b-int8"
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, ckpt, pre, pre8, out)), flush=True)
        return
    import torch

    t = time.perf_counter()
    make_checkpoint(ckpt, args.layers)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s; GPU {torch.cuda.get_device_name()}", flush=True)
    results, warmed = [], {}
    for case in args.cases:
        folder = pre if case in ("tf_pre", "fq_pre") else pre8 if case in ("tf_pre8", "fq_pre8") else ckpt
        if folder not in warmed or case.startswith("cold_"):  # the 128 GB page cache holds all three folders
            warmed[folder] = warm(folder)
        bw = warmed[folder]
        if case.startswith("cold_"):
            warmed.pop(folder)
            drop_cache(folder)
            bw = 0.0
        p = subprocess.run([sys.executable, __file__, "--work", str(work), "--out", str(out), "--case", case],
                           capture_output=True, text=True, timeout=900, check=False)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{case} FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["page_cache_gbps"] = bw
        results.append(r)
        print(json.dumps(r), flush=True)
        # after every case: a call cut by its time limit still brings back what it measured (run 13's A)
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1))
        by = {r["case"]: r for r in results}
        for a, b in PAIRS:
            if case in (a, b) and a in by and b in by:
                compare_pair(a, b, by, out)
    print("case         load_s  gpu_peak/reserved/after_GB  anon/file_peak_GB  rss_peak_GB  tok/s  phases / ring")
    for r in results:
        ring = r.get("ring", {})
        ring_s = " ".join(f"{k}:{v['busy_s']:.2f}s@{v.get('GBps', 0):.0f}GB/s[{v['start']:.2f}-{v['end']:.2f}]"
                          for k, v in ring.items())
        ph = " ".join(f"{k}={v:.2f}" for k, v in r.get("phases", {}).items())
        print(f"{r['case']:<12} {r['load_s']:6.2f}  {r.get('gpu_peak_gb', 0):6.2f}/{r.get('gpu_reserved_peak_gb', 0):6.2f}/"
              f"{r.get('gpu_allocated_after_gb', 0):6.3f}  {r.get('anon_peak_gb', 0):6.2f}/{r.get('file_peak_gb', 0):6.2f}  "
              f"{r['rss_gb']:8.2f}  "
              f"{r.get('tok_s', 0):5.1f}  {ph} {ring_s}")


if __name__ == "__main__":
    main()
